//! The data encryption key of a database: generation, the `file` key provider, per-process
//! loading and caching, and the SQL functions about the key.
//!
//! ## What lives where
//! * **In the database** (`cellcrypt.keyring`): only what verifies and identifies a key: its
//!   version, public fingerprint, Argon2id salt and parameters, state, who created it and when.
//!   Never the key.
//! * **In the key provider**: the administrator's key string. The `file` provider keeps one file
//!   per database, `<key_directory>/<system identifier>_<database oid>.key`, mode 0600 in a
//!   0700 directory, written atomically (temporary file, fsync, rename, fsync of the directory).
//!   Naming it by the cluster's system identifier means a database restored into another
//!   cluster never picks up a key it was not given.
//! * **In each backend**: a [`Keyring`] of ready ciphers, loaded on first use by reading the
//!   keyring rows, reading the provider, running Argon2id and checking the fingerprint. It is
//!   revalidated once per transaction (a syscache lookup), so `DROP`/`CREATE EXTENSION` in a
//!   session is noticed.

use crate::errors;
use cellcrypt_core::kdf::{new_salt, KdfParams, MasterKey};
use cellcrypt_core::{AdminKey, Keyring, NonceSource};
use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode};
use std::cell::{Cell, RefCell};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use zeroize::Zeroizing;

/// The keys this backend holds for its database.
pub struct LoadedKeys {
    keyring_relid: pg_sys::Oid,
    pub ring: Keyring,
    pub current_version: u32,
}

/// Why the database's key is not usable in this backend.
pub enum KeyUnavailable {
    /// The keyring has no current key version (should not happen after CREATE EXTENSION).
    NoKeyConfigured,
    /// The provider does not have the key of this version: e.g. after a restore elsewhere.
    NotInProvider { version: u32, fingerprint: String },
    /// The provider's key does not match the stored fingerprint.
    FingerprintMismatch { version: u32, expected: String, found: String },
    /// The key provider could not be read.
    ProviderError(String),
}

impl KeyUnavailable {
    pub fn raise(&self) -> ! {
        let restore_hint = "Restore the database's key with SELECT set_data_encryption_key('<the original key>'); as an administrator over a secure connection.";
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
                Some("The key provider has no key for this database, as after a restore into another cluster."),
                Some(restore_hint),
            ),
            KeyUnavailable::FingerprintMismatch { version, expected, found } => errors::raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("the key provider holds a different key than this database expects (key version {version})"),
                Some(&format!("Expected fingerprint {expected}, the provider's key has fingerprint {found}.")),
                Some(restore_hint),
            ),
            KeyUnavailable::ProviderError(e) => errors::raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("could not read the data encryption key: {e}"),
                None,
                Some("Check pg_cellcrypt.key_directory and the permissions of the key file."),
            ),
        }
    }
}

thread_local! {
    static LOADED: RefCell<Option<std::rc::Rc<LoadedKeys>>> = const { RefCell::new(None) };
    static NONCES: RefCell<Option<NonceSource>> = const { RefCell::new(None) };
    static VALIDATED_THIS_XACT: Cell<bool> = const { Cell::new(false) };
}

/// Registers the end-of-transaction callback that makes the next use revalidate the cache.
pub fn init() {
    // SAFETY: called once from _PG_init.
    unsafe { pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut()) };
}

#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(_event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    VALIDATED_THIS_XACT.with(|v| v.set(false));
}

fn keyring_relid() -> pg_sys::Oid {
    // SAFETY: syscache lookups inside a transaction.
    unsafe {
        let nsp = pg_sys::get_namespace_oid(c"cellcrypt".as_ptr(), true);
        if nsp == pg_sys::InvalidOid {
            return pg_sys::InvalidOid;
        }
        pg_sys::get_relname_relid(c"keyring".as_ptr(), nsp)
    }
}

/// Forgets this backend's keys (after a key change, or when the extension was reinstalled).
pub fn invalidate() {
    LOADED.with(|l| *l.borrow_mut() = None);
}

/// The keys of this database, loading them on first use. Raises the fitting error when the key
/// is not available.
pub fn loaded() -> std::rc::Rc<LoadedKeys> {
    match try_loaded() {
        Ok(k) => k,
        Err(e) => e.raise(),
    }
}

pub fn try_loaded() -> Result<std::rc::Rc<LoadedKeys>, KeyUnavailable> {
    if !VALIDATED_THIS_XACT.with(|v| v.get()) {
        let relid = keyring_relid();
        LOADED.with(|l| {
            let mut l = l.borrow_mut();
            if l.as_ref().map(|k| k.keyring_relid) != Some(relid) {
                *l = None;
            }
        });
        VALIDATED_THIS_XACT.with(|v| v.set(true));
    }
    if let Some(k) = LOADED.with(|l| l.borrow().clone()) {
        return Ok(k);
    }
    let k = std::rc::Rc::new(load()?);
    LOADED.with(|l| *l.borrow_mut() = Some(k.clone()));
    Ok(k)
}

/// Runs `f` with this backend's nonce source (created on first use, after fork).
pub fn with_nonces<R>(f: impl FnOnce(&mut NonceSource) -> R) -> R {
    NONCES.with(|n| {
        let mut n = n.borrow_mut();
        f(n.get_or_insert_with(NonceSource::from_os))
    })
}

struct KeyRow {
    version: u32,
    fingerprint: String,
    salt: Vec<u8>,
    params: KdfParams,
}

/// Runs `f` as the bootstrap superuser, the way PostgreSQL's own internals read catalogs on
/// behalf of an unprivileged caller. Used only for fixed, schema-qualified queries on
/// `cellcrypt.*`: every role that writes encrypted columns must be able to load the key
/// without any privilege on the keyring. An error aborts the transaction, which restores the
/// caller's identity.
fn as_extension_owner<R>(f: impl FnOnce() -> R) -> R {
    let mut saved_user = pg_sys::InvalidOid;
    let mut saved_context = 0;
    // SAFETY: plain backend calls; identity restored below and on abort by PostgreSQL.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        pg_sys::SetUserIdAndSecContext(
            pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID),
            saved_context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
    }
    let r = f();
    unsafe { pg_sys::SetUserIdAndSecContext(saved_user, saved_context) };
    r
}

fn read_key_rows() -> Vec<KeyRow> {
    as_extension_owner(read_key_rows_unchecked)
}

fn read_key_rows_unchecked() -> Vec<KeyRow> {
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT key_version, fingerprint, kdf_salt, kdf_memory_kib, kdf_iterations, kdf_parallelism \
             FROM cellcrypt.keyring WHERE state IN ('current', 'previous') ORDER BY state = 'current' DESC, key_version DESC",
            None,
            &[],
        )?;
        let mut out = Vec::new();
        for row in rows {
            out.push(KeyRow {
                version: row.get::<i32>(1)?.unwrap_or(0) as u32,
                fingerprint: row.get::<String>(2)?.unwrap_or_default(),
                salt: row.get::<Vec<u8>>(3)?.unwrap_or_default(),
                params: KdfParams {
                    m_cost_kib: row.get::<i32>(4)?.unwrap_or(0) as u32,
                    t_cost: row.get::<i32>(5)?.unwrap_or(0) as u32,
                    p_cost: row.get::<i32>(6)?.unwrap_or(0) as u32,
                },
            });
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .unwrap_or_else(|e| {
        errors::raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("could not read the pg_cellcrypt keyring: {e}"),
            None,
            None,
        )
    })
}

/// Parses a key text from the provider, derives its master key with the row's salt and
/// parameters, and checks it against the row's fingerprint.
fn verify(row: &KeyRow, key_text: &str) -> Result<(AdminKey, MasterKey), KeyUnavailable> {
    let key = AdminKey::parse(key_text).map_err(|e| KeyUnavailable::ProviderError(format!("the key file holds an invalid key: {e}")))?;
    let master = MasterKey::derive(&key, &row.salt, &row.params).map_err(|e| KeyUnavailable::ProviderError(e.to_string()))?;
    let found = master.fingerprint().to_string();
    if found != row.fingerprint {
        return Err(KeyUnavailable::FingerprintMismatch { version: row.version, expected: row.fingerprint.clone(), found });
    }
    Ok((key, master))
}

fn load() -> Result<LoadedKeys, KeyUnavailable> {
    let relid = keyring_relid();
    let rows = read_key_rows();
    let Some(current) = rows.first() else {
        return Err(KeyUnavailable::NoKeyConfigured);
    };
    let stored = file_provider::read_all().map_err(KeyUnavailable::ProviderError)?;
    let mut ring = Keyring::new();
    for row in &rows {
        let is_current = row.version == current.version;
        let Some((_, key_text)) = stored.iter().find(|(v, _)| *v == row.version) else {
            if is_current {
                return Err(KeyUnavailable::NotInProvider { version: row.version, fingerprint: row.fingerprint.clone() });
            }
            continue;
        };
        // An older version that does not verify is skipped; the current one must verify.
        match verify(row, key_text) {
            Ok((_, master)) => ring.insert(row.version, &master.data_key(), is_current),
            Err(e) if is_current => return Err(e),
            Err(_) => continue,
        }
    }
    Ok(LoadedKeys { keyring_relid: relid, ring, current_version: current.version })
}

/// The current key as the provider holds it now, verified against the stored fingerprint.
fn verified_current_key() -> Result<AdminKey, KeyUnavailable> {
    let rows = read_key_rows();
    let current = rows.first().ok_or(KeyUnavailable::NoKeyConfigured)?;
    let stored = file_provider::read_all().map_err(KeyUnavailable::ProviderError)?;
    let (_, key_text) = stored
        .iter()
        .find(|(v, _)| *v == current.version)
        .ok_or_else(|| KeyUnavailable::NotInProvider { version: current.version, fingerprint: current.fingerprint.clone() })?;
    verify(current, key_text).map(|(key, _)| key)
}

/// The `file` key provider.
pub mod file_provider {
    use super::*;

    /// `<key_directory>/<system identifier>_<database oid>.key`
    pub fn path() -> PathBuf {
        // SAFETY: plain reads of backend globals.
        let (sysid, dboid) = unsafe { (pg_sys::GetSystemIdentifier(), pg_sys::MyDatabaseId) };
        crate::gucs::key_directory().join(format!("{sysid}_{}.key", dboid.to_u32()))
    }

    /// Every `(version, key)` the file holds. A missing file holds nothing.
    pub fn read_all() -> Result<Vec<(u32, Zeroizing<String>)>, String> {
        let p = path();
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => Zeroizing::new(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("could not read key file \"{}\": {e}", p.display())),
        };
        let mut out = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (v, k) = line.split_once(' ').ok_or_else(|| format!("key file \"{}\" is malformed", p.display()))?;
            let v: u32 = v.parse().map_err(|_| format!("key file \"{}\" is malformed", p.display()))?;
            out.push((v, Zeroizing::new(k.trim().to_owned())));
        }
        Ok(out)
    }

    /// Replaces the file's contents atomically and durably. A previous file is kept beside it
    /// as `.key.replaced-<unix time>` so no key is ever destroyed by accident.
    pub fn write_all(entries: &[(u32, &str)]) -> Result<(), String> {
        let p = path();
        let dir = p.parent().expect("key path has a directory").to_path_buf();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("could not create key directory \"{}\": {e}", dir.display()))?;
        let mut body = Zeroizing::new(String::from(
            "# pg_cellcrypt data encryption key. Keep this file secret and back it up:\n# without it the encrypted data of this database cannot be read.\n",
        ));
        for (v, k) in entries {
            body.push_str(&format!("{v} {k}\n"));
        }
        let tmp = dir.join(format!(".{}.tmp{}", p.file_name().unwrap().to_string_lossy(), std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(body.as_bytes())?;
            f.sync_all()?;
            if p.exists() {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                let keep = dir.join(format!("{}.replaced-{now}", p.file_name().unwrap().to_string_lossy()));
                std::fs::hard_link(&p, &keep)?;
            }
            std::fs::rename(&tmp, &p)?;
            std::fs::File::open(&dir)?.sync_all()?;
            Ok(())
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("could not write key file \"{}\": {e}", p.display())
        })
    }
}

fn kdf_params_from_settings() -> KdfParams {
    KdfParams {
        m_cost_kib: crate::gucs::KDF_MEMORY_KIB.get() as u32,
        t_cost: crate::gucs::KDF_ITERATIONS.get() as u32,
        p_cost: 1,
    }
}

/// Called once by the extension's install script: generates the database's first key, stores
/// it through the provider and records its fingerprint. Encryption is active from then on.
#[unsafe(no_mangle)]
#[doc(hidden)]
pub extern "C" fn pg_finfo_cellcrypt_initialize() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

#[unsafe(no_mangle)]
#[pg_guard]
pub unsafe extern "C-unwind" fn cellcrypt_initialize(_fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let existing: i64 = Spi::get_one("SELECT count(*) FROM cellcrypt.keyring").ok().flatten().unwrap_or(0);
    if existing > 0 {
        return pg_sys::Datum::from(false);
    }
    let key = AdminKey::generate();
    let salt = new_salt();
    let params = kdf_params_from_settings();
    let master = MasterKey::derive(&key, &salt, &params).unwrap_or_else(|e| {
        errors::raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, e.to_string(), None, Some("Check pg_cellcrypt.kdf_memory_kib and pg_cellcrypt.kdf_iterations."))
    });
    if let Err(e) = file_provider::write_all(&[(1, key.as_str())]) {
        errors::raise(
            PgSqlErrorCode::ERRCODE_IO_ERROR,
            e,
            None,
            Some("pg_cellcrypt.key_directory must name a directory the server can create and write, outside the data directory."),
        );
    }
    Spi::run_with_args(
        "INSERT INTO cellcrypt.keyring (key_version, fingerprint, kdf_salt, kdf_memory_kib, kdf_iterations, kdf_parallelism, state, provider) \
         VALUES (1, $1, $2, $3, $4, $5, 'current', 'file')",
        &[
            master.fingerprint().to_string().into(),
            salt.to_vec().into(),
            (params.m_cost_kib as i32).into(),
            (params.t_cost as i32).into(),
            (params.p_cost as i32).into(),
        ],
    )
    .unwrap_or_else(|e| errors::raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("could not record the key: {e}"), None, None));
    invalidate();
    pg_sys::Datum::from(true)
}

/// `is_data_encryption_active() returns boolean`: true when the database has a key and this
/// backend could load and verify it.
#[pg_extern(volatile, parallel_safe)]
fn is_data_encryption_active() -> bool {
    try_loaded().map(|k| k.ring.current().is_some()).unwrap_or(false)
}

/// True when this backend's client connection is protected: SSL, a Unix-domain socket, or no
/// client at all (a background worker). A client whose transport cannot be told is not trusted.
fn connection_is_secure() -> bool {
    // SAFETY: MyProcPort and MyBEEntry are this backend's own, set up at connection start.
    unsafe {
        if pg_sys::MyProcPort.is_null() {
            return true;
        }
        match pg_sys::MyBEEntry.as_ref() {
            Some(entry) => entry.st_ssl || i32::from(entry.st_clientaddr.addr.ss_family) == libc::AF_UNIX,
            None => false,
        }
    }
}

/// Key calls travel only over protected connections, like Dynamics' HTTPS rule.
pub fn require_secure_transport(function: &str) {
    if !crate::gucs::REQUIRE_SECURE_TRANSPORT.get() || connection_is_secure() {
        return;
    }
    errors::raise(
        PgSqlErrorCode::ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION,
        format!("{function} requires a secure connection"),
        Some("This connection is TCP without SSL, so a key would cross the network in the clear."),
        Some("Reconnect with SSL (sslmode=require or stronger) or over the server's Unix socket."),
    )
}

/// Only superusers and members of `data_encryption_admin` manage keys.
pub fn require_admin(function: &str) {
    if !crate::roles::current_user_has(crate::roles::ADMIN) {
        errors::raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied for {function}: only superusers and members of role data_encryption_admin manage the data encryption key"),
            None,
            Some("Ask an administrator to run GRANT data_encryption_admin TO <your role>."),
        )
    }
}

/// `retrieve_data_encryption_key() returns text`: the database's current key, for backup.
/// Superusers and `data_encryption_admin` only, over a secure connection. The key is checked
/// against the stored fingerprint before it is shown.
#[pg_extern(volatile, parallel_unsafe)]
fn retrieve_data_encryption_key() -> String {
    require_admin("retrieve_data_encryption_key()");
    require_secure_transport("retrieve_data_encryption_key()");
    match verified_current_key() {
        Ok(key) => key.as_str().to_owned(),
        Err(e) => e.raise(),
    }
}

/// `generate_data_encryption_key() returns text`: a fresh key in the copy-safe format. Changes
/// nothing.
#[pg_extern(volatile, parallel_safe)]
fn generate_data_encryption_key() -> String {
    AdminKey::generate().as_str().to_owned()
}

//! The administrator's SQL functions about the key: `is_data_encryption_active`,
//! `generate_data_encryption_key`, `retrieve_data_encryption_key`, `set_data_encryption_key`
//! and `data_encryption_status`; who may call them; one change at a time; and what happens when
//! a change's transaction ends.
//!
//! ## A key change, step by step
//! 1. The caller must be an administrator on a secure connection (else 42501 / 28000).
//! 2. The extension's key-change lock (`policy.rs`) refuses a second change at once (55P03, naming who started
//!    the running one and when). The lock is transaction-scoped, so a session that dies or a
//!    server that crashes never leaves it behind.
//! 3. The new key is validated (a weak key is refused with 22023) and derived with a fresh salt.
//! 4. In the keyring, the old current version becomes `previous`, and the data key of every
//!    older version still in use is wrapped under the new key; the new version becomes current.
//! 5. The `file` provider's file gains the new key *before* commit, so a crash at any point
//!    leaves a key file that opens whichever version the keyring says is current. Older
//!    versions stay in the file (a backup or a point-in-time recovery from before the change
//!    needs them); after a rollback the file is put back as it was.
//! 6. One re-encryption job per table with encrypted columns is recorded (`reencrypt.rs`).
//! 7. At commit the new key goes to the shared key cache and the shared generation is bumped:
//!    from then on every backend, and every parallel worker, seals with the new key; and the
//!    database's re-encryption worker is started (`worker.rs`). The next change is refused
//!    until the jobs are done and the old key retired.
//!
//! A **restore** (the database holds data whose key is not loaded) checks the given key
//! against the stored fingerprint and, if it matches, stores it through the provider. A wrong
//! key is refused with both fingerprints and changes nothing.

use crate::audit::{self, Event};
use crate::policy;
use crate::errors;
use crate::gucs::KeyProvider;
use crate::key_cache;
use crate::keystate::{self, KeyFile, Stage};
use crate::keys::{self, KeyRow, KeyUnavailable};
use crate::providers;
use cellcrypt_core::kdf::{new_salt, KdfParams, MasterKey};
use cellcrypt_core::AdminKey;
use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode};
use zeroize::Zeroizing;

/// Registers the transaction callbacks that carry out what a transaction staged
/// (`keystate.rs`) when it, or one of its subtransactions, ends.
pub fn init() {
    // SAFETY: called once from _PG_init.
    unsafe {
        pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(subxact_callback), std::ptr::null_mut());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    keys::end_of_transaction();
    match event {
        pg_sys::XactEvent::XACT_EVENT_PRE_PREPARE if keystate::has_staged() => errors::raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "cannot PREPARE a transaction that changed pg_cellcrypt's keys",
            Some("What a key change does outside the database (the key provider, the shared key cache, the re-encryption worker) happens when its own session commits."),
            Some("Run key calls in ordinary transactions."),
        ),
        pg_sys::XactEvent::XACT_EVENT_COMMIT => {
            if let Some(s) = keystate::transaction_committed() {
                commit_effects(s);
            }
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT => {
            for s in keystate::transaction_aborted() {
                abort_effects(s);
            }
        }
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn subxact_callback(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    parent_subid: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    match event {
        pg_sys::SubXactEvent::SUBXACT_EVENT_COMMIT_SUB => keystate::subtransaction_committed(my_subid, parent_subid),
        pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB => {
            if let Some(s) = keystate::subtransaction_aborted(my_subid) {
                abort_effects(s);
            }
        }
        _ => {}
    }
}

/// With provider "none" the key lives only in shared memory: makes sure it can, before the
/// transaction that sets it commits (53000 otherwise).
fn reserve_cache_slot() {
    if !key_cache::reserve() {
        errors::raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_RESOURCES,
            "the shared key cache has no room for this database's key, and provider \"none\" keeps it nowhere else",
            Some(&format!("Every one of its {} slots holds the key of another live database.", key_cache::SLOTS)),
            Some("Use the file or command provider (pg_cellcrypt.key_provider), or drop unused databases."),
        )
    }
}

/// `entries` with `version` holding `text`, in version order.
/// A line of another key under the same version (rows a restore replaced) is kept: a backup
/// from before the restore needs it, and loading tries every line of a version.
fn with_key(mut entries: KeyFile, version: u32, text: &str) -> KeyFile {
    entries.retain(|(v, k)| !(*v == version && k.as_str() == text));
    entries.push((version, Zeroizing::new(text.to_owned())));
    entries.sort_by_key(|(v, _)| *v);
    entries
}

/// After `pg_upgrade`: once the key has been loaded (and the old cluster's key file copied under
/// this cluster's name), records this cluster's key file location, so that the next upgrade
/// finds it. Called by the re-encryption worker at server start; does nothing otherwise.
pub fn note_key_location() {
    if providers::current() != KeyProvider::File || !providers::file::path().exists() {
        return;
    }
    let here = crate::store::this_key_location();
    let recorded = crate::store::key_location();
    // After an upgrade (another system identifier), or a failover or a moved key directory
    // (another directory): what the next upgrade will read must name this cluster's file.
    if recorded.is_some_and(|r| r.database_oid == here.database_oid && (r.system_identifier != here.system_identifier || r.key_directory != here.key_directory)) {
        crate::store::record_key_location();
    }
}

/// Writes the key file. Also what an abort uses to put the file back, so it runs no SQL.
fn write_key_file(entries: &KeyFile) -> Result<(), String> {
    let refs: Vec<(u32, &str)> = entries.iter().map(|(v, k)| (*v, k.as_str())).collect();
    providers::file::write_all(&refs)
}

/// A key call's write of the key file. First, in this transaction, where the file is
/// (`cellcrypt.key_location`, which lets the cluster made by `pg_upgrade` find it), and that
/// an abort puts `before` back; then the file. A failure at any step leaves nothing undone.
fn store_key_file(before: KeyFile, entries: &KeyFile) {
    crate::store::record_key_location();
    keystate::stage(|p| {
        p.file_after_abort.get_or_insert(before);
    });
    write_key_file(entries).unwrap_or_else(|e| key_io_error(e));
}

/// The transaction committed: announce the new key. Must not raise (the commit is done).
fn commit_effects(p: Stage) {
    crate::fault::point("commit:before_effects");
    // Publishing overwrites this database's slot in place: forgetting first would free it for
    // another database between the two steps, and the key would then have no slot.
    if p.forget && p.publish.is_none() {
        key_cache::forget();
    }
    if let Some((version, keys, text)) = &p.publish {
        if !key_cache::put(*version, keys, text.as_ref().map(|t| t.as_str())) {
            pgrx::warning!("pg_cellcrypt: the shared key cache is full; other sessions will read the key from the key provider");
        }
    }
    if p.forget || p.publish.is_some() || p.announce {
        key_cache::bump_generation();
    }
    // SAFETY: a backend global.
    if p.launch_worker && !crate::worker::start_worker(unsafe { pg_sys::MyDatabaseId }) {
        pgrx::warning!(
            "pg_cellcrypt could not start its re-encryption worker (no free background worker slot); run CALL finish_data_encryption_reencryption(); or raise max_worker_processes"
        );
    }
    for (action, version, fp) in &p.audit {
        audit::record(&Event { action, outcome: "committed", key_version: *version, fingerprint: Some(fp), detail: "" });
    }
}

/// A (sub)transaction that staged something rolled back: undo what it did outside the database.
fn abort_effects(p: Stage) {
    if let Some(entries) = &p.file_after_abort {
        // No file before: none after (an empty one would hide an upgraded cluster's old file).
        if entries.is_empty() {
            let _ = std::fs::remove_file(providers::file::path());
        } else if let Err(e) = write_key_file(entries) {
            pgrx::warning!("pg_cellcrypt: {e}; the key file holds the new key too, which is harmless");
        }
    }
    for (action, version, fp) in &p.audit {
        audit::record(&Event { action, outcome: "rolled back", key_version: *version, fingerprint: Some(fp), detail: "" });
    }
}

/// `cellcrypt._keyring_write_is_internal()`, called by the keyring's BEFORE INSERT trigger.
/// False for rows that arrive from a dump being restored: they replace the key CREATE
/// EXTENSION generated, and every backend must reload its keys.
#[unsafe(no_mangle)]
#[doc(hidden)]
pub extern "C" fn pg_finfo_cellcrypt_keyring_write_is_internal() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

#[unsafe(no_mangle)]
#[pg_guard]
pub unsafe extern "C-unwind" fn cellcrypt_keyring_write_is_internal(_fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let internal = crate::store::internal_write_in_progress();
    if !internal {
        keys::invalidate();
        keystate::stage(|p| {
            p.forget = true;
            p.publish = None;
        });
    }
    pg_sys::Datum::from(internal)
}

/// `cellcrypt._refuse_restore_over_live_data()`, called by the key tables' BEFORE INSERT
/// trigger before rows from a dump replace the ones in place: refuses (55000) while any table
/// holds a value that opens under the keys in place, since replacing them would make that value
/// unreadable for good. A database whose extension was just created (a restore's usual target)
/// has no such value, and the restore goes on.
#[unsafe(no_mangle)]
#[doc(hidden)]
pub extern "C" fn pg_finfo_cellcrypt_refuse_restore_over_live_data() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

#[unsafe(no_mangle)]
#[pg_guard]
pub unsafe extern "C-unwind" fn cellcrypt_refuse_restore_over_live_data(_fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // One restoring session at a time, each looking with the latest snapshot, not its COPY's:
    // with pg_restore -j, the keyring may have been replaced by another session of the same
    // restore after this statement began, and a value written after it began must be seen.
    crate::policy::lock_waiting(crate::policy::Lock::RestoreFromDump);
    crate::store::read_latest(check_restore_over_live_data);
    pg_sys::Datum::from(0)
}

fn check_restore_over_live_data() {
    // The checks read with the latest snapshot; SPI gives a statement of a transaction with
    // an id its transaction snapshot instead under REPEATABLE READ and SERIALIZABLE, which could
    // miss a value written meanwhile. A restore runs in READ COMMITTED (pg_restore's default).
    // SAFETY: a backend global.
    if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
        errors::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "rows from a dump cannot replace this database's keyring in a REPEATABLE READ or SERIALIZABLE transaction; nothing was replaced",
            Some("Checking that no value still needs the keyring in place must see every committed value."),
            Some("Restore with READ COMMITTED, for example PGOPTIONS='-c default_transaction_isolation=read\\ committed' pg_restore ..."),
        )
    }
    let versions = crate::store::live_key_versions(false);
    if versions.is_empty() {
        return;
    }
    let listed = versions.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ");
    let refuse = |code: PgSqlErrorCode, detail: String, hint: &str| -> ! {
        audit::record(&Event {
            action: "restore from dump",
            outcome: "refused",
            key_version: versions.iter().max().map(|v| *v as u32),
            fingerprint: None,
            detail: &detail,
        });
        errors::raise(code, "rows from a dump would replace this database's keyring while its data may need it; nothing was replaced", Some(&detail), Some(hint))
    };
    // No key change, re-encryption batch or index key rotation runs meanwhile, to the end of
    // this transaction; and none may be under way (its jobs would outlive the keyring they were
    // made for).
    if !crate::policy::try_lock_shared(crate::policy::Lock::KeyChange)
        || !crate::policy::try_lock_shared(crate::policy::Lock::IndexKeyRotation)
        || crate::store::has_reencryption_work()
    {
        refuse(
            PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
            "A key change, its re-encryption or a blind-index key rotation is under way.".to_owned(),
            "Restore once data_encryption_status says the re-encryption is complete (CALL finish_data_encryption_reencryption(); finishes it now).",
        );
    }
    if let Some(what) = crate::store::restore_blockers() {
        refuse(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("{what} may hold values under this database's key (version {listed}), which a restore cannot look into."),
            "Finish the prepared transactions (COMMIT PREPARED or ROLLBACK PREPARED) and end the sessions that hold temporary tables with encrypted columns, then restore again.",
        );
    }
    if let Some(table) = crate::store::relation_with_live_values(&versions) {
        let detail = if keys::try_loaded().is_ok() {
            format!("{table} holds values encrypted under this database's key (version {listed}), which the dumped keyring cannot open.")
        } else {
            format!("{table} holds values under key version {listed}; this database's key is not loaded, so they cannot be told apart from the dump's.")
        };
        refuse(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            detail,
            "Restore the dump into a new database (CREATE DATABASE, CREATE EXTENSION pg_cellcrypt, then restore), or empty the encrypted tables of this one before a data-only restore.",
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Creating the first key

fn kdf_params_from_settings() -> KdfParams {
    KdfParams {
        m_cost_kib: crate::gucs::KDF_MEMORY_KIB.get() as u32,
        t_cost: crate::gucs::KDF_ITERATIONS.get() as u32,
        p_cost: 1,
    }
}

/// A new key version of `key`: HKDF for a generated key, Argon2id with the settings for a
/// passphrase (see cellcrypt_core::kdf).
fn derive_new(key: &AdminKey) -> ([u8; 16], KdfParams, MasterKey) {
    let salt = new_salt();
    let params = KdfParams::for_new_version(key, kdf_params_from_settings());
    let master = MasterKey::derive(key, &salt, &params).unwrap_or_else(|e| {
        errors::raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, e.to_string(), None, Some("Check pg_cellcrypt.kdf_memory_kib and pg_cellcrypt.kdf_iterations."))
    });
    (salt, params, master)
}

fn insert_key_row(version: u32, salt: &[u8], params: &KdfParams, master: &MasterKey) {
    crate::store::insert_current_key(version, &master.fingerprint().to_string(), salt, params, providers::name(providers::current()));
}

/// Stores blind-index key `index_version`, wrapped under data key `wrapping_version` (whose
/// master key is `master`): inserted as the current index key, or re-wrapped in place.
pub fn store_index_key(index_version: u32, wrap_key: &cellcrypt_core::SecretKey, wrapping_version: u32, key: &cellcrypt_core::SecretKey, insert: bool) {
    let wrapped = cellcrypt_core::wrap::wrap_index_key(wrap_key, wrapping_version, index_version, key);
    crate::store::store_index_key(index_version, wrapped, wrapping_version, insert);
}

fn key_io_error(e: String) -> ! {
    errors::raise(
        PgSqlErrorCode::ERRCODE_IO_ERROR,
        e,
        None,
        Some("pg_cellcrypt.key_directory must name a directory the server can create and write, outside the data directory."),
    )
}

/// Called once by the extension's install script: creates the database's first key, stores
/// it through the provider and records its fingerprint. Encryption is active from then on.
/// With the `command` provider the first key is the one the command prints (bring your own
/// key); otherwise a fresh key is generated.
#[unsafe(no_mangle)]
#[doc(hidden)]
pub extern "C" fn pg_finfo_cellcrypt_initialize() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

#[unsafe(no_mangle)]
#[pg_guard]
pub unsafe extern "C-unwind" fn cellcrypt_initialize(_fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    if crate::store::keyring_has_rows() {
        return pg_sys::Datum::from(false);
    }
    // Citus creating the extension on a worker (propagated from the coordinator, or replayed by
    // citus_add_node): no key of the worker's own; its keyring waits for the cluster's, which
    // the coordinator shares (citus.rs).
    if crate::citus::internal_backend() && crate::citus::citus_in_database() {
        pgrx::notice!("pg_cellcrypt: created by Citus on a worker node; this database waits for its coordinator's keyring (no key of its own)");
        return pg_sys::Datum::from(false);
    }
    let provider = providers::current();
    // With the `file` provider, a key file this database already has keeps every line: it is
    // what a DROP and CREATE EXTENSION (as `pg_restore --clean` runs them) finds, and the keyring
    // restored next names one of its versions. The new key is a fresh one, with a version above
    // all of them, never one found in the file (a database that reuses a dropped database's OID
    // must not adopt its key).
    let existing = match provider {
        KeyProvider::File => providers::file::read_all().unwrap_or_else(|e| key_io_error(e)),
        _ => Vec::new(),
    };
    let version = existing.iter().map(|(v, _)| *v).max().map_or(1, |v| v.saturating_add(1));
    if version > cellcrypt_core::envelope::MAX_KEY_VERSION {
        key_io_error(format!("the key file of this database names key version {}, above the largest a value can carry (65535)", version - 1));
    }
    let (version, key) = match provider {
        // Bring your own key: the first key is the one the command prints (its newest version,
        // when it prints the key file format).
        KeyProvider::Command => {
            let printed = providers::command::keys().unwrap_or_else(|e| KeyUnavailable::ProviderError(e).raise());
            let (v, text) = printed.into_iter().max_by_key(|(v, _)| *v).unwrap_or((None, Zeroizing::new(String::new())));
            let key = AdminKey::parse(&text).unwrap_or_else(|e| weak_key(&format!("the key printed by pg_cellcrypt.key_command is not usable: {e}")));
            (v.unwrap_or(version), key)
        }
        _ => (version, AdminKey::generate()),
    };
    let (salt, params, master) = derive_new(&key);
    match provider {
        KeyProvider::File => {
            store_key_file(existing.clone(), &with_key(existing.clone(), version, key.as_str()));
            crate::fault::point("create:key_file_written");
            if !existing.is_empty() {
                pgrx::warning!(
                    "pg_cellcrypt: this database's key file already held key versions up to {}; they are kept, and the new key is version {version}",
                    version - 1
                );
            }
        }
        KeyProvider::None => {
            reserve_cache_slot();
            pgrx::warning!(
                "pg_cellcrypt.key_provider is \"none\": this database's key lives only in memory. Run SELECT retrieve_data_encryption_key(); now and keep the key safe: after a restart it must be restored with set_data_encryption_key."
            );
        }
        KeyProvider::Command => {}
    }
    insert_key_row(version, &salt, &params, &master);
    // The blind-index key: random, independent of the data key, kept wrapped under it.
    let index_key = cellcrypt_core::SecretKey::random();
    let derived = master.version_keys();
    drop(master);
    store_index_key(1, &derived.wrap, version, &index_key, true);
    let fp = derived.fingerprint.to_string();
    let installed = derived.duplicate();
    keystate::install_keys(keys::LoadedKeys::build(keys::keyring_relid(), keys::generation_now(), version, installed.data, installed.wrap, Vec::new(), Some((1, index_key))));
    keystate::stage(|p| {
        p.forget = true;
        p.publish = Some((version, derived, text_for_cache(&key)));
    });
    audit::record(&Event { action: "create", outcome: "started", key_version: Some(version), fingerprint: Some(&fp), detail: "first key, at CREATE EXTENSION" });
    keystate::stage(|p| p.audit.push(("create", Some(version), fp)));
    pg_sys::Datum::from(true)
}

fn weak_key(reason: &str) -> ! {
    errors::raise(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        format!("the key is not acceptable: {reason}"),
        Some(if cellcrypt_core::fips::ENABLED {
            "This is a FIPS build: a key is a generated key (from generate_data_encryption_key()), 256 random bits from the FIPS module."
        } else {
            "A key is either a generated key (from generate_data_encryption_key()) or a passphrase of at least 20 characters, with at least 80 bits of estimated entropy, that a strength estimator (zxcvbn) cannot guess in fewer than 10^10 tries."
        }),
        Some("Use SELECT generate_data_encryption_key(); to get a strong key."),
    )
}

// ---------------------------------------------------------------------------------------------
// The SQL functions

/// `is_data_encryption_active() returns boolean`: true when the database has a key and this
/// backend could load and verify it. Anyone may call it.
#[pg_extern(volatile, parallel_safe)]
fn is_data_encryption_active() -> bool {
    keys::is_active()
}

/// `generate_data_encryption_key() returns text`: a fresh key in the copy-safe format. Changes
/// nothing.
#[pg_extern(volatile, parallel_safe)]
fn generate_data_encryption_key() -> String {
    AdminKey::generate().as_str().to_owned()
}

/// `retrieve_data_encryption_key() returns text`: the database's current key, for backup.
/// Superusers and `data_encryption_admin` only, over a secure connection. The key is checked
/// against the stored fingerprint before it is shown.
#[pg_extern(volatile, parallel_unsafe)]
fn retrieve_data_encryption_key() -> String {
    policy::require_admin("retrieve_data_encryption_key()");
    policy::require_secure_transport("retrieve_data_encryption_key()", "retrieve_data_encryption_key()");
    let rows = keys::read_key_rows();
    let Some(current) = rows.first().filter(|r| r.state == "current") else {
        policy::refuse("retrieve_data_encryption_key()", "no key configured");
        KeyUnavailable::NoKeyConfigured.raise()
    };
    match keys::current_key_text(current) {
        Ok(text) => {
            audit::record(&Event {
                action: "retrieve",
                outcome: "succeeded",
                key_version: Some(current.version),
                fingerprint: Some(&current.fingerprint),
                detail: "",
            });
            text.as_str().to_owned()
        }
        Err(e) => {
            policy::refuse("retrieve_data_encryption_key()", "the key is not loaded");
            e.raise()
        }
    }
}

/// `set_data_encryption_key(key text) returns text`: sets, changes or restores the database's
/// key, and returns what it did. See the module documentation.
#[pg_extern(volatile, parallel_unsafe)]
fn set_data_encryption_key(key: &str) -> String {
    const F: &str = "set_data_encryption_key()";
    crate::hooks::hide_statement_text();
    policy::require_admin(F);
    policy::require_primary(F);
    policy::require_secure_transport(F, F);
    if key.len() > key_cache::MAX_KEY_TEXT {
        policy::refuse(F, "key longer than 256 bytes");
        weak_key("it is longer than 256 bytes");
    }
    let new_key = match AdminKey::parse(key) {
        Ok(k) => k,
        Err(e) => {
            policy::refuse(F, &format!("weak or malformed key: {e}"));
            weak_key(&e.to_string())
        }
    };

    policy::refuse_while_reencrypting(F);
    policy::lock_or_refuse(policy::Lock::KeyChange, F);
    let rows = keys::read_key_rows();
    let Some(current) = rows.first().filter(|r| r.state == "current") else {
        policy::refuse(F, "no key configured");
        KeyUnavailable::NoKeyConfigured.raise()
    };
    match keys::current_version_keys(current) {
        Ok(keys) => {
            // A key that is already current changes nothing, on any node.
            if keys::verify(current, &new_key).is_ok() {
                return change(&rows, keys, new_key);
            }
            match crate::citus::role() {
                crate::citus::Role::Alone => change(&rows, keys, new_key),
                crate::citus::Role::Worker => {
                    crate::citus::refuse_single_node_key_change(F);
                    unreachable!("refused on a worker")
                }
                crate::citus::Role::Coordinator => {
                    crate::citus::require_all_workers_reachable(F);
                    let text = Zeroizing::new(new_key.as_str().to_owned());
                    let mut message = change(&rows, keys, new_key);
                    let workers = crate::citus::change_on_workers(&text);
                    message.push_str(&format!("; on the coordinator and its {workers} workers, from this transaction's commit (each re-encrypts its own shards)"));
                    message
                }
            }
        }
        Err(_) => restore(&rows, new_key),
    }
}

/// `share_data_encryption_keyring()`: on a Citus coordinator, gives every worker the cluster's
/// keyring (fingerprints, salts, wrapped keys and blind-index registrations; never a key), in
/// this transaction. A worker takes it into an empty keyring (a node `citus_add_node` just
/// added) or finds it identical; a worker with a keyring of its own refuses, and nothing
/// changes anywhere.
#[pg_extern(volatile, parallel_unsafe)]
fn share_data_encryption_keyring() -> String {
    const F: &str = "share_data_encryption_keyring()";
    policy::require_admin(F);
    policy::require_primary(F);
    policy::require_secure_transport(F, F);
    match crate::citus::role() {
        crate::citus::Role::Coordinator => {}
        crate::citus::Role::Alone => return "not shared: this database is not the coordinator of a Citus cluster with workers".to_owned(),
        crate::citus::Role::Worker => errors::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("{F} runs on the coordinator of the Citus cluster, not on a worker"),
            None,
            Some("Run it on the coordinator after citus_add_node."),
        ),
    }
    if !crate::store::keyring_has_rows() {
        KeyUnavailable::NoKeyConfigured.raise()
    }
    let n = crate::citus::share_keyring();
    audit::record(&Event { action: "share keyring", outcome: "started", key_version: None, fingerprint: None, detail: &format!("with {n} workers") });
    format!("shared: the keyring is the same on the coordinator and its {n} workers (from this transaction's commit)")
}

/// The coordinator's `reencryption` status with every worker's: "complete" when every node is;
/// otherwise each node that is not, by name.
fn cluster_reencryption(local: String, version: Option<i32>) -> String {
    let workers = crate::citus::on_each_worker(&format!(
        "SELECT COALESCE(key_version::pg_catalog.text, 'none') OPERATOR(pg_catalog.||) '|' OPERATOR(pg_catalog.||) reencryption FROM {}.data_encryption_status",
        crate::store::extension_schema()
    ));
    let version = version.map_or_else(|| "none".to_owned(), |v| v.to_string());
    if workers.is_empty() {
        return local;
    }
    let mut busy = Vec::new();
    if !local.starts_with("complete") {
        busy.push(format!("coordinator: {local}"));
    }
    for (node, r) in &workers {
        match r.as_ref().map(|s| s.split_once('|').unwrap_or(("none", s.as_str()))) {
            Ok((v, _)) if v != version => busy.push(format!("{node}: key version {v}, not the coordinator's {version}")),
            Ok((_, s)) if s.starts_with("complete") => {}
            Ok((_, s)) => busy.push(format!("{node}: {s}")),
            Err(e) => busy.push(format!("{node}: unknown ({e})")),
        }
    }
    if busy.is_empty() {
        format!("complete (coordinator and {} workers)", workers.len())
    } else {
        format!("running on the cluster: {}", busy.join("; "))
    }
}

/// `cellcrypt._cluster_set_data_encryption_key(keyring, index_key, key)`: run on a Citus worker
/// by its coordinator's `set_data_encryption_key` (citus.rs), in the coordinator's distributed
/// transaction, which this worker PREPAREs. So nothing is staged for commit here: the key file
/// gains the new key now (it keeps the old one, so a rollback loses nothing), and what the
/// commit announces (other sessions reload their keys, the re-encryption worker starts) is done
/// when `COMMIT PREPARED` runs ([`after_commit_prepared`]).
#[unsafe(no_mangle)]
#[doc(hidden)]
pub extern "C" fn pg_finfo_cellcrypt_cluster_set_data_encryption_key() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

#[unsafe(no_mangle)]
#[pg_guard]
pub unsafe extern "C-unwind" fn cellcrypt_cluster_set_data_encryption_key(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    const F: &str = "set_data_encryption_key() on a Citus worker";
    crate::hooks::hide_statement_text();
    require_superuser_on_worker(F);
    policy::require_primary(F);
    policy::require_secure_transport(F, F);
    if crate::citus::role() != crate::citus::Role::Worker || !crate::citus::internal_backend() {
        errors::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "only a Citus worker takes a key change, from its coordinator's set_data_encryption_key",
            None,
            Some("Change the key on the coordinator."),
        )
    }
    let [keyring, index_key, key_text] = three_text_args(fcinfo);
    policy::refuse_while_reencrypting(F);
    policy::lock_or_refuse(policy::Lock::KeyChange, F);
    let provider = providers::current();
    if provider == KeyProvider::None {
        errors::raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "a Citus worker with pg_cellcrypt.key_provider = 'none' cannot take a key change",
            Some("The worker commits the change as a prepared transaction, after this session's memory is gone."),
            Some("Use the file or command provider on the workers."),
        )
    }
    let new_key = AdminKey::parse(&key_text).unwrap_or_else(|e| weak_key(&e.to_string()));
    let rows = keys::read_key_rows();
    let Some(old) = rows.first().filter(|r| r.state == "current") else { KeyUnavailable::NoKeyConfigured.raise() };
    // The worker must hold the key the coordinator replaces (the same keyring row), and have
    // it loaded: otherwise it could not open the values of its shards to re-encrypt them.
    if !crate::store::cluster_keyring_has(&keyring, old.version, &old.fingerprint, &old.salt) {
        errors::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("this worker's key (version {}, fingerprint {}) is not the one the coordinator replaces; nothing was changed", old.version, old.fingerprint),
            None,
            Some("Give the worker the cluster's keyring first: SELECT share_data_encryption_keyring(); on the coordinator."),
        )
    }
    // What this worker holds, from its committed keyring and its provider (not this backend's
    // cached keys).
    let before = keys::assemble(keys::keyring_relid(), keys::generation_now(), &rows, keys::current_version_keys(old).unwrap_or_else(|e| e.raise()));
    // Only what a change makes: the keyring here plus one new current version (nothing
    // dropped, nothing else added), and every data key and the blind-index key still there,
    // wrapped under the new key. Anything else is refused, and nothing changes.
    let refuse_keyring = || -> ! {
        errors::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "the keyring sent for this key change is not this worker's keyring with one new version; nothing was changed",
            None,
            Some("Give the worker the cluster's keyring first (SELECT share_data_encryption_keyring(); on the coordinator), then change the key on the coordinator."),
        )
    };
    if !crate::store::cluster_keyring_extends_ours(&keyring) {
        refuse_keyring()
    }
    let file_before = (provider == KeyProvider::File).then(|| providers::file::read_all().unwrap_or_else(|e| key_io_error(e)));
    crate::store::replace_with_cluster_keyring(&keyring, &index_key);
    let rows = keys::read_key_rows();
    let Some(new) = rows.first().filter(|r| r.state == "current") else { KeyUnavailable::NoKeyConfigured.raise() };
    let Ok(master) = keys::verify(new, &new_key) else {
        errors::raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, "the key the coordinator sent does not match its keyring; nothing was changed", None, None)
    };
    let after = keys::assemble(keys::keyring_relid(), keys::generation_now(), &rows, master.version_keys());
    drop(master);
    let same_key = |a: &cellcrypt_core::SecretKey, b: &cellcrypt_core::SecretKey| a.expose() == b.expose();
    let keeps_data_keys = before.data_keys.iter().all(|(v, k)| after.data_keys.iter().any(|(w, l)| v == w && same_key(k, l)));
    let keeps_index_key = match (&before.index_key, &after.index_key) {
        (Some((v, k)), Some((w, l))) => v == w && same_key(k, l),
        (None, None) => true,
        _ => false,
    };
    if !keeps_data_keys || !keeps_index_key {
        refuse_keyring()
    }
    match provider {
        KeyProvider::File => {
            // Lines above every version this worker had come from a change that rolled back
            // after this worker wrote its file (a prepared transaction cannot undo it): dropped.
            let highest = before.data_keys.iter().map(|(v, _)| *v).max().unwrap_or(0).max(old.version);
            let mut kept = file_before.expect("read above with the file provider");
            kept.retain(|(v, _)| *v <= highest);
            crate::store::record_key_location();
            write_key_file(&with_key(kept, new.version, new_key.as_str())).unwrap_or_else(|e| key_io_error(e));
        }
        KeyProvider::Command => require_command_prints(&new_key, old, new.version),
        KeyProvider::None => unreachable!("refused above"),
    }
    keys::invalidate();
    let tables = crate::reencrypt::create_jobs(new.version);
    audit::record(&Event {
        action: "change",
        outcome: "started",
        key_version: Some(new.version),
        fingerprint: Some(&new.fingerprint),
        detail: &format!("from the Citus coordinator; replaces key version {}; {tables} tables to re-encrypt", old.version),
    });
    pg_sys::Datum::from(0)
}

/// After `COMMIT PREPARED` in a database with the extension (hooks.rs): when the committed
/// keyring's current version (and fingerprint) is news, a cluster-wide key change (or a keyring
/// taken from the coordinator) has just committed here: every session reloads its keys, this
/// one loads the new one, and the re-encryption worker starts if there is work. Every
/// distributed write of Citus ends with COMMIT PREPARED, often in a backend Citus just opened:
/// each backend remembers the version it last saw, and the server the version some backend
/// last acted on (`key_cache::announce`), so a change is acted on once per server, not once per
/// backend. It must not raise (the commit is done): interrupts are held (a cancel or
/// statement_timeout waits until it returns), and a failure is a warning.
pub fn after_commit_prepared() {
    static SEEN: crate::backend_local::BackendLocal<std::cell::RefCell<Option<(u32, String)>>> =
        crate::backend_local::BackendLocal::new(std::cell::RefCell::new(None));
    // SAFETY: HOLD_INTERRUPTS(); an error inside resets the count to 0 (errfinish), so it is
    // restored to what it was, not decremented.
    let held = unsafe { pg_sys::InterruptHoldoffCount };
    unsafe { pg_sys::InterruptHoldoffCount = held + 1 };
    let done = crate::reencrypt::catching_errors(|| {
        let rows = keys::read_key_rows();
        let Some(row) = rows.first().filter(|r| r.state == "current") else { return };
        let now = (row.version, row.fingerprint.clone());
        if SEEN.with(|s| s.borrow().as_ref() == Some(&now)) {
            return;
        }
        let fingerprint = row.fingerprint.parse::<cellcrypt_core::Fingerprint>().ok();
        if fingerprint.as_ref().is_some_and(|f| key_cache::announced(row.version, f)) {
            SEEN.with(|s| *s.borrow_mut() = Some(now));
            return;
        }
        key_cache::bump_generation();
        keys::invalidate();
        if keys::try_loaded().is_err() {
            pgrx::log!("pg_cellcrypt: key version {} is committed here, but this node cannot load it yet; check its key provider", row.version);
        }
        // SAFETY: a backend global.
        if crate::store::has_reencryption_work() && !crate::worker::start_worker(unsafe { pg_sys::MyDatabaseId }) {
            pgrx::warning!(
                "pg_cellcrypt could not start its re-encryption worker (no free background worker slot); run CALL finish_data_encryption_reencryption(); or raise max_worker_processes"
            );
        }
        // Recorded only once acted on: a backend that failed above leaves it to the next one.
        if let Some(f) = &fingerprint {
            key_cache::announce(row.version, f);
        }
        SEEN.with(|s| *s.borrow_mut() = Some(now));
    });
    // SAFETY: RESUME_INTERRUPTS() to the count found above.
    unsafe { pg_sys::InterruptHoldoffCount = held };
    if let Err(message) = done {
        pgrx::warning!("pg_cellcrypt: after COMMIT PREPARED: {message}; sessions reload their keys at the next key change or restart");
    }
}

/// The three text arguments of a worker's entry point (STRICT C functions of three `text`
/// arguments, so none is NULL), in zeroizing strings: one of them may be a key.
///
/// # Safety
/// `fcinfo` must be the call of such a function.
unsafe fn three_text_args(fcinfo: pg_sys::FunctionCallInfo) -> [Zeroizing<String>; 3] {
    let args = (*fcinfo).args.as_slice(3);
    std::array::from_fn(|i| Zeroizing::new(pgrx::FromDatum::from_datum(args[i].value, false).unwrap_or_default()))
}

/// The worker's entry points run only as a superuser: the coordinator calls them over Citus'
/// connections as the Citus extension's owner (citus.rs), after checking its own caller. An
/// administrator of a worker who is not a superuser cannot reach them (setting
/// `application_name` to look like Citus does not help).
fn require_superuser_on_worker(function: &str) {
    // SAFETY: a plain backend check of the current user.
    if !unsafe { pg_sys::superuser() } {
        policy::refuse(function, "not a superuser");
        errors::raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied for {function}: the Citus coordinator calls it, as a superuser"),
            None,
            Some("Run set_data_encryption_key or share_data_encryption_keyring() on the coordinator."),
        )
    }
}

/// True when this node's own keyring may still be needed: a value stored under one of its
/// versions, or a place the check cannot see into (prepared transactions, other sessions'
/// temporary tables).
fn worker_holds_values() -> bool {
    let versions = crate::store::live_key_versions(true);
    !versions.is_empty() && (crate::store::restore_blockers().is_some() || crate::store::relation_with_live_values(&versions).is_some())
}

/// `cellcrypt._adopt_cluster_keyring(keyring, index_key, blind_index_columns)`: run on a Citus
/// worker by its coordinator (citus.rs), in the coordinator's distributed transaction.
#[unsafe(no_mangle)]
#[doc(hidden)]
pub extern "C" fn pg_finfo_cellcrypt_adopt_cluster_keyring() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

#[unsafe(no_mangle)]
#[pg_guard]
pub unsafe extern "C-unwind" fn cellcrypt_adopt_cluster_keyring(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    const F: &str = "taking the cluster's keyring";
    require_superuser_on_worker(F);
    policy::require_primary(F);
    policy::require_secure_transport(F, F);
    if crate::citus::role() != crate::citus::Role::Worker {
        errors::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "only a Citus worker takes the cluster's keyring",
            None,
            Some("The coordinator shares it: SELECT share_data_encryption_keyring(); on the coordinator."),
        )
    }
    let [keyring, index_key, columns] = three_text_args(fcinfo);
    policy::lock_or_refuse(policy::Lock::KeyChange, F);
    match crate::store::adopt_cluster_keyring(&keyring, &index_key, &columns) {
        crate::store::Adoption::Taken => {
            keys::invalidate();
            audit::record(&Event { action: "join cluster", outcome: "started", key_version: None, fingerprint: None, detail: "took the coordinator's keyring" });
        }
        crate::store::Adoption::Same => {}
        // A keyring of its own under which no value is stored (the extension was dropped and
        // created again on the coordinator, or by pg_restore --clean, and the worker made its
        // own meanwhile): the cluster's replaces it, as rows from a dump replace a new database's.
        crate::store::Adoption::Different if !worker_holds_values() => {
            crate::store::replace_with_cluster_keyring(&keyring, &index_key);
            crate::store::adopt_cluster_keyring(&keyring, &index_key, &columns);
            keys::invalidate();
            audit::record(&Event {
                action: "join cluster",
                outcome: "started",
                key_version: None,
                fingerprint: None,
                detail: "took the coordinator's keyring in place of its own, under which no value was stored",
            });
        }
        crate::store::Adoption::Different => {
            audit::record(&Event { action: "join cluster", outcome: "refused", key_version: None, fingerprint: None, detail: "this worker has a keyring of its own" });
            errors::raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "this worker has a keyring of its own, not the coordinator's, and values stored under it; nothing was changed",
                Some("pg_cellcrypt was created on this node with a key of its own, and tables here hold values encrypted under it."),
                Some("A worker takes the cluster's keyring only in place of one that no stored value needs: move or delete the values this node holds under its own key first."),
            )
        }
    }
    pg_sys::Datum::from(0)
}

fn restore(rows: &[KeyRow], key: AdminKey) -> String {
    let current = &rows[0];
    let master = match keys::verify(current, &key) {
        Ok(m) => m,
        Err(keys::VerifyError::NotDerivable(reason, why)) => {
            audit::record(&Event {
                action: "restore",
                outcome: "refused",
                key_version: Some(current.version),
                fingerprint: Some(&current.fingerprint),
                detail: &why,
            });
            // A passphrase for a generated key's version is a wrong key (22023); an Argon2id
            // version in a FIPS build cannot be derived here at all (0A000); parameters out of
            // range mean an altered keyring row (XX001).
            let (code, hint) = match reason {
                keys::Underivable::WrongKind => (
                    PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                    "Use the generated key retrieved with retrieve_data_encryption_key() from the database this data comes from.",
                ),
                keys::Underivable::Fips => (PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED, keys::NOT_DERIVABLE_HINT),
                keys::Underivable::Damaged => (PgSqlErrorCode::ERRCODE_DATA_CORRUPTED, keys::DAMAGED_KEYRING_HINT),
            };
            errors::raise(code, format!("this key cannot restore this database's key: {why}; nothing was changed"), None, Some(hint))
        }
        Err(keys::VerifyError::Mismatch(given)) => {
            audit::record(&Event {
                action: "restore",
                outcome: "refused",
                key_version: Some(current.version),
                fingerprint: Some(&current.fingerprint),
                detail: &format!("wrong key: its fingerprint is {given}"),
            });
            errors::raise(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                "this is not the key of this database's encrypted data; nothing was changed",
                Some(&format!("Expected a key with fingerprint {} (key version {}); the given key has fingerprint {given}.", current.fingerprint, current.version)),
                Some("Use the key retrieved with retrieve_data_encryption_key() from the database this data comes from."),
            )
        }
    };
    let fp = current.fingerprint.clone();
    crate::store::settle_restored_rows();
    let mut message = format!("restored: key version {} (fingerprint {fp}) is loaded", current.version);
    match providers::current() {
        KeyProvider::File => {
            let previous = providers::file::read_all().unwrap_or_else(|e| key_io_error(e));
            store_key_file(previous.clone(), &with_key(previous.clone(), current.version, key.as_str()));
            crate::fault::point("restore:key_file_written");
        }
        KeyProvider::Command => {
            message.push_str("; pg_cellcrypt.key_command must print this key before the next restart");
            pgrx::warning!("{}", command_update_warning(current.version, &fp));
        }
        KeyProvider::None => {
            reserve_cache_slot();
            message.push_str("; provider \"none\" holds it in memory until the next restart");
        }
    }
    let derived = master.version_keys();
    drop(master);
    keystate::install_keys(keys::assemble(keys::keyring_relid(), keys::generation_now(), rows, derived.duplicate()));
    audit::record(&Event { action: "restore", outcome: "started", key_version: Some(current.version), fingerprint: Some(&fp), detail: "" });
    keystate::stage(|p| {
        p.publish = Some((current.version, derived, text_for_cache(&key)));
        p.audit.push(("restore", Some(current.version), fp));
        p.launch_worker = rows.len() > 1;
    });
    message
}

fn command_update_warning(version: u32, fp: &str) -> String {
    format!(
        "the key provider is \"command\", which pg_cellcrypt never writes to: update the key source so that pg_cellcrypt.key_command prints the new key (key version {version}, fingerprint {fp}) before the server restarts; until then the server holds the key in memory"
    )
}

/// Refuses a change (55000) unless `pg_cellcrypt.key_command` already prints, in the key file
/// format, both the current key (as `current.version`, verified against its fingerprint) and
/// the new one (as `new_version`).
fn require_command_prints(new_key: &AdminKey, current: &KeyRow, new_version: u32) {
    let current_version = current.version;
    let printed = providers::command::keys().unwrap_or_else(|e| KeyUnavailable::ProviderError(e).raise());
    let prints_new = printed.iter().any(|(v, text)| *v == Some(new_version) && AdminKey::parse(text).is_ok_and(|k| k.same_as(new_key)));
    let prints_current = || keys::is_key_of(current, printed.iter().filter(|(v, _)| *v == Some(current_version)).map(|(_, text)| text.as_str()));
    // Both: until the change commits (or if it rolls back) the current key is still the one in use.
    if !(prints_new && prints_current()) {
        policy::refuse("set_data_encryption_key()", "pg_cellcrypt.key_command does not print the new key yet");
        errors::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "pg_cellcrypt.key_command does not print the new key yet; nothing was changed",
            Some("With the command provider the new key must be in the key source before the change commits: a restart right after the change would otherwise find no key for what was written under it."),
            Some(&format!(
                "Add the new key to the key source first, so that the command prints the key file format: a first line starting with \"# pg_cellcrypt\", then \"{current_version} <the current key>\" and \"{new_version} <the new key>\". Then call set_data_encryption_key again."
            )),
        )
    }
}

/// The administrator's key text as the shared cache may hold it: only with the `none`
/// provider, where the cache is its only copy.
fn text_for_cache(key: &AdminKey) -> Option<Zeroizing<String>> {
    (providers::current() == KeyProvider::None).then(|| Zeroizing::new(key.as_str().to_owned()))
}

fn change(rows: &[KeyRow], old: cellcrypt_core::VersionKeys, new_key: AdminKey) -> String {
    let current = &rows[0];
    // A new key is kept as one line of text (the key file, a KMS entry): no control characters.
    // (A restore takes the key as it was, whatever it holds.)
    if new_key.as_str().chars().any(char::is_control) {
        policy::refuse("set_data_encryption_key()", "key with a control character");
        weak_key("it contains a control character (a line break, a tab)");
    }
    // The key file as it is, read once (no other key call can write it: this one holds the
    // key-change lock).
    let file_before = (providers::current() == KeyProvider::File).then(|| providers::file::read_all().unwrap_or_else(|e| key_io_error(e)));
    // Setting the key that is already current changes nothing: the given key, run through
    // derived with the current version's salt and parameters, has its fingerprint. (Neither the shared cache
    // nor this backend holds the current key's text to compare with.)
    if keys::verify(current, &new_key).is_ok() {
        // A key file that lost the current key (overwritten, or deleted, while the server ran)
        // gets it back: this is how an administrator repairs it with the copy they kept.
        if let Some(before) = file_before {
            if !keys::file_holds_key(current, &before) {
                store_key_file(before.clone(), &with_key(before, current.version, new_key.as_str()));
                audit::record(&Event {
                    action: "change",
                    outcome: "unchanged",
                    key_version: Some(current.version),
                    fingerprint: Some(&current.fingerprint),
                    detail: "the key file had lost the current key; written back",
                });
                return format!(
                    "unchanged: the given key is already the current key (version {}, fingerprint {}); the key file had lost it and holds it again",
                    current.version, current.fingerprint
                );
            }
        }
        audit::record(&Event {
            action: "change",
            outcome: "unchanged",
            key_version: Some(current.version),
            fingerprint: Some(&current.fingerprint),
            detail: "the given key is already the current key",
        });
        return format!("unchanged: the given key is already the current key (version {}, fingerprint {})", current.version, current.fingerprint);
    }
    let loaded = keys::assemble(keys::keyring_relid(), keys::generation_now(), rows, old);
    // Above every version the keyring, the rows a restore replaced and the key file know.
    let in_file = file_before.iter().flatten().map(|(v, _)| *v).max().unwrap_or(0);
    let new_version = crate::store::max_key_version().unwrap_or(current.version).max(current.version).max(in_file) + 1;
    if new_version > cellcrypt_core::envelope::MAX_KEY_VERSION {
        errors::raise(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            "this database has used all 65535 key versions",
            Some("A value's envelope has 16 bits for its key version."),
            Some("Move the data into a new database (CREATE EXTENSION gives it key version 1)."),
        )
    }
    // With the command provider the key must be in the key source before the change commits:
    // a restart right after it would otherwise find no key for the data written since.
    if providers::current() == KeyProvider::Command {
        require_command_prints(&new_key, current, new_version);
    }
    let mut notes = Vec::new();
    if let Some(before) = &file_before {
        // The file must still hold the key being replaced, verified: backups and point-in-
        // time recovery from before the change need it, and no memory holds its text. A
        // file that lost it (overwritten or deleted while the server ran) is repaired by
        // setting the current key again; only when that key is lost too may a superuser
        // let the change go on (it re-encrypts everything from the keys in memory).
        if !keys::file_holds_key(current, before) {
            if !crate::gucs::CHANGE_WITH_LOST_KEY.get() {
                policy::refuse("set_data_encryption_key()", "the key file does not hold the current key");
                errors::raise(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    "the key file no longer holds the key being replaced; nothing was changed",
                    Some(&format!(
                        "{} has no line for key version {} that matches its fingerprint {}: it was overwritten or deleted while the server ran. Backups from before a change would need that key.",
                        providers::file::path().display(),
                        current.version,
                        current.fingerprint
                    )),
                    Some("Write the current key back with SELECT set_data_encryption_key('<the current key>'); then change it. If no copy of the current key is left: SET pg_cellcrypt.change_with_lost_key = on (superuser) and change the key, then back up the new one at once."),
                )
            }
            pgrx::warning!(
                "pg_cellcrypt: the key file had lost key version {} (the key being replaced); backups taken before this change cannot be read without it",
                current.version
            );
            notes.push(format!("the key file had lost key version {}", current.version));
        }
    }
    let (salt, params, master) = derive_new(&new_key);
    let fp = master.fingerprint().to_string();
    let derived = master.version_keys();
    audit::record(&Event { action: "change", outcome: "started", key_version: Some(new_version), fingerprint: Some(&fp), detail: &format!("replaces key version {}", current.version) });
    keystate::stage(|p| p.audit.push(("change", Some(new_version), fp.clone())));

    crate::store::settle_restored_rows();
    // The keyring: older versions keep their data key, wrapped under the new key.
    for (version, data_key) in &loaded.data_keys {
        crate::store::demote_key(*version, cellcrypt_core::wrap::wrap_data_key(&derived.wrap, new_version, *version, data_key));
    }
    insert_key_row(new_version, &salt, &params, &master);
    drop(master);

    match providers::current() {
        KeyProvider::File => {
            // The file gains the new version before commit and keeps every older one after it:
            // a crash at any point finds the version the keyring says is current, and a backup
            // or point-in-time recovery from before the change finds the key it needs.
            let before = file_before.expect("read above with the file provider");
            let after = with_key(before.clone(), new_version, new_key.as_str());
            store_key_file(before, &after);
            crate::fault::point("change:key_file_written");
        }
        KeyProvider::Command => {}
        KeyProvider::None => {
            reserve_cache_slot();
            notes.push("provider \"none\": back up the new key with retrieve_data_encryption_key()".to_owned());
        }
    }

    // The blind-index key stays the same, re-wrapped under the new key: blind indexes stay valid.
    let keys::LoadedKeys { data_keys, index_key, .. } = loaded;
    if let Some((iv, ik)) = &index_key {
        store_index_key(*iv, &derived.wrap, new_version, ik, false);
    }
    // From here on this transaction seals with the new key.
    let installed = derived.duplicate();
    keystate::install_keys(keys::LoadedKeys::build(keys::keyring_relid(), keys::generation_now(), new_version, installed.data, installed.wrap, data_keys, index_key));
    keystate::stage(|p| p.publish = Some((new_version, derived, text_for_cache(&new_key))));
    keystate::announce_at_commit();

    let tables = crate::reencrypt::create_jobs(new_version);
    keystate::stage(|p| p.launch_worker = tables > 0);
    let mut msg = format!(
        "changed: key version {new_version} (fingerprint {fp}) is current; {tables} tables will be re-encrypted in the background (see data_encryption_progress)"
    );
    for n in notes {
        msg.push_str("; ");
        msg.push_str(&n);
    }
    msg
}

/// `data_encryption_status()`: one row about this database's key. Administrators only; the
/// `data_encryption_status` view shows it.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_unsafe)]
fn data_encryption_status() -> TableIterator<
    'static,
    (
        name!(active, bool),
        name!(key_version, Option<i32>),
        name!(fingerprint, Option<String>),
        name!(set_at, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(set_by, Option<String>),
        name!(provider, String),
        name!(previous_key_versions, Vec<i32>),
        name!(reencryption, String),
        name!(reencrypted_values, Option<i64>),
        name!(crypto_module, String),
        name!(fips_mode, bool),
    ),
> {
    policy::require_admin("data_encryption_status()");
    let active = keys::is_active();
    let cur = crate::store::current_key_status();
    let previous: Vec<i32> = keys::read_key_rows().iter().filter(|r| r.state == "previous").map(|r| r.version as i32).collect();
    // The job table in one read-only query: the view also answers on a standby, where no
    // transaction id can be assigned.
    let (done, total, blocked) = crate::store::job_summary();
    let reencryption = match (done, total, blocked) {
        (_, _, Some(waiting)) if waiting.starts_with("waiting: ") => waiting,
        (_, _, Some(blocked)) => format!(
            "blocked: {blocked}. The worker retries every {} seconds",
            crate::worker::BLOCKED_RETRY.as_secs()
        ),
        (Some(done), Some(total), None) if total > 0 => format!("running: {done} of {total} tables done (see data_encryption_progress); key changes wait until it finishes"),
        _ if !previous.is_empty() && crate::store::keep_previous_keys() => {
            "complete; older key versions are kept, wrapped under the current key, on a Citus cluster".to_owned()
        }
        _ if !previous.is_empty() => "pending: older key versions are still readable; the re-encryption worker or CALL finish_data_encryption_reencryption() retires them".to_owned(),
        _ => "complete".to_owned(),
    };
    // On a Citus coordinator: the whole cluster. Each worker re-encrypts its own shards; the
    // change is complete when every node says so.
    let reencryption = cluster_reencryption(reencryption, cur.0);
    TableIterator::once((
        active,
        cur.0,
        cur.1,
        cur.2,
        cur.3,
        providers::name(providers::current()).to_owned(),
        previous,
        reencryption,
        cur.4,
        cellcrypt_core::fips::module().to_owned(),
        cellcrypt_core::fips::fips_mode(),
    ))
}

// Runs last: grants on the key functions, the admin views, and the first key.
pgrx::extension_sql!(
    r#"
CREATE FUNCTION cellcrypt._initialize() RETURNS boolean
    AS 'MODULE_PATHNAME', 'cellcrypt_initialize' LANGUAGE c VOLATILE;
REVOKE ALL ON FUNCTION cellcrypt._initialize() FROM PUBLIC;
-- Citus: a worker takes its coordinator's keyring (citus.rs). Executable by PUBLIC like the key
-- functions: it refuses non-administrators itself.
CREATE FUNCTION cellcrypt._adopt_cluster_keyring(keyring text, index_key text, blind_index_columns text) RETURNS void
    AS 'MODULE_PATHNAME', 'cellcrypt_adopt_cluster_keyring' LANGUAGE c VOLATILE STRICT;
CREATE FUNCTION cellcrypt._cluster_set_data_encryption_key(keyring text, index_key text, key text) RETURNS void
    AS 'MODULE_PATHNAME', 'cellcrypt_cluster_set_data_encryption_key' LANGUAGE c VOLATILE STRICT;
-- The key functions are executable by PUBLIC: each refuses non-administrators itself
-- (policy.rs), with SQLSTATE 42501, a hint naming data_encryption_admin and an audit record.
CREATE VIEW @extschema@.data_encryption_status AS SELECT * FROM @extschema@.data_encryption_status();
CREATE VIEW @extschema@.data_encryption_audit AS SELECT * FROM @extschema@.data_encryption_audit();
GRANT SELECT ON @extschema@.data_encryption_status, @extschema@.data_encryption_audit TO PUBLIC;

-- DDL that would keep encrypted values out of re-encryption's reach is refused (types.rs):
-- an encrypted value stored in an expression (a DEFAULT, a view, a rule, a constraint, an index,
-- a policy, a trigger's WHEN, a SQL-standard function body) was sealed once, when the statement
-- was parsed, and would outlive its key; encrypted values inside arrays, domains or composite
-- types are not rewritten by re-encryption.
CREATE FUNCTION cellcrypt._holds_encrypted(t oid, ours oid[]) RETURNS boolean LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp AS $$
    WITH RECURSIVE r(t) AS (
        SELECT t
        UNION
        SELECT z.x FROM r JOIN pg_catalog.pg_type y ON y.oid = r.t,
             LATERAL (SELECT y.typelem WHERE y.typlen = -1 AND y.typelem <> 0
                      UNION ALL SELECT y.typbasetype WHERE y.typtype = 'd'
                      UNION ALL SELECT a.atttypid FROM pg_catalog.pg_attribute a
                                WHERE y.typrelid <> 0 AND a.attrelid = y.typrelid AND a.attnum > 0 AND NOT a.attisdropped
                      UNION ALL SELECT g.rngsubtype FROM pg_catalog.pg_range g WHERE g.rngtypid = y.oid) z(x)
    )
    SELECT EXISTS (SELECT FROM r WHERE r.t = ANY (ours))
$$;
CREATE FUNCTION cellcrypt._check_ddl() RETURNS event_trigger LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ours oid[];
    pattern text;
    cmd record;
    found text;
BEGIN
    -- The extension's encrypted types, found through pg_depend's index on the referenced
    -- object. Only its base types: PostgreSQL 17 and later also record the array types and the
    -- row types of an extension's types and tables as its members, and an array of an
    -- encrypted type is what this trigger refuses.
    SELECT array_agg(d.objid) INTO ours
      FROM pg_depend d JOIN pg_type y ON y.oid = d.objid
     WHERE d.refclassid = 'pg_extension'::regclass
       AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_cellcrypt')
       AND d.classid = 'pg_type'::regclass AND d.deptype = 'e'
       AND y.typtype = 'b' AND y.typelem = 0;
    IF ours IS NULL THEN
        RETURN;
    END IF;
    -- Constants of the types themselves, or of their arrays.
    SELECT '(' || string_agg(o::text, '|') || ')' INTO pattern
      FROM (SELECT unnest(ours) AS o UNION SELECT typarray FROM pg_type WHERE oid = ANY (ours)) t;
    pattern := ':consttype ' || pattern || ' [^{}]*:constisnull false';
    FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
        SELECT string_agg(what, ', ') INTO found FROM (
            SELECT format('the default of column %I of %s', a.attname, c.adrelid::regclass) AS what
              FROM pg_attrdef c JOIN pg_attribute a ON a.attrelid = c.adrelid AND a.attnum = c.adnum
             WHERE c.adrelid = cmd.objid AND c.adbin::text ~ pattern
            UNION ALL
            SELECT format('rule %I of %s', r.rulename, r.ev_class::regclass) FROM pg_rewrite r
             WHERE (r.ev_class = cmd.objid OR r.oid = cmd.objid) AND r.ev_action::text ~ pattern
            UNION ALL
            SELECT format('function %s', p.oid::regprocedure) FROM pg_proc p
             WHERE p.oid = cmd.objid AND p.prosqlbody::text ~ pattern
            UNION ALL
            SELECT format('the default of domain %s', t.oid::regtype) FROM pg_type t
             WHERE t.oid = cmd.objid AND t.typdefaultbin::text ~ pattern
            UNION ALL
            SELECT format('constraint %I', k.conname) FROM pg_constraint k
             WHERE (k.conrelid = cmd.objid OR k.contypid = cmd.objid OR k.oid = cmd.objid) AND k.conbin::text ~ pattern
            UNION ALL
            SELECT format('policy %I', o.polname) FROM pg_policy o
             WHERE (o.polrelid = cmd.objid OR o.oid = cmd.objid) AND (o.polqual::text ~ pattern OR o.polwithcheck::text ~ pattern)
            UNION ALL
            SELECT format('index %s', i.indexrelid::regclass) FROM pg_index i
             WHERE (i.indrelid = cmd.objid OR i.indexrelid = cmd.objid) AND (i.indexprs::text ~ pattern OR i.indpred::text ~ pattern)
            UNION ALL
            SELECT format('trigger %I', g.tgname) FROM pg_trigger g
             WHERE (g.tgrelid = cmd.objid OR g.oid = cmd.objid) AND g.tgqual::text ~ pattern
        ) s;
        IF found IS NOT NULL THEN
            RAISE EXCEPTION 'pg_cellcrypt: % would keep an encrypted value in the catalog', found
                USING ERRCODE = 'feature_not_supported',
                      DETAIL = 'A value of an encrypted type written in an expression is encrypted once, when the statement is parsed, and stored with the expression: it would outlive the key it was sealed under.',
                      HINT = 'Write the value in its plain type, e.g. DEFAULT ''none''::text: it is then encrypted for each row.';
        END IF;
        SELECT string_agg(what, ', ') INTO found FROM (
            SELECT format('column %I of %s (type %s)', a.attname, a.attrelid::regclass, format_type(a.atttypid, a.atttypmod)) AS what
              FROM pg_attribute a
             WHERE a.attrelid = cmd.objid AND a.attnum > 0 AND NOT a.attisdropped
               AND NOT a.atttypid = ANY (ours) AND cellcrypt._holds_encrypted(a.atttypid, ours)
            UNION ALL
            SELECT format('type %s', t.oid::regtype) FROM pg_type t
             WHERE t.oid = cmd.objid AND NOT t.oid = ANY (ours) AND cellcrypt._holds_encrypted(t.oid, ours)
            UNION ALL
            -- A composite type (ALTER TYPE ... ADD ATTRIBUTE) is a pg_class entry.
            SELECT format('type %s', c.reltype::regtype) FROM pg_class c
             WHERE c.oid = cmd.objid AND c.relkind = 'c' AND cellcrypt._holds_encrypted(c.reltype, ours)
            UNION ALL
            -- A table given encrypted columns while its row type (or an array of it) is a column
            -- of another table, a domain's base or a composite's attribute: those values would
            -- nest encrypted ones.
            SELECT format('table %s, whose row type is used by %s', c.oid::regclass, pg_describe_object(d.classid, d.objid, d.objsubid))
              FROM pg_class c
              JOIN pg_type r ON r.oid = c.reltype
              JOIN pg_depend d ON d.refclassid = 'pg_type'::regclass AND d.refobjid IN (r.oid, r.typarray) AND d.deptype = 'n'
                              AND ((d.classid = 'pg_class'::regclass AND d.objsubid > 0 AND d.objid <> c.oid) OR d.classid = 'pg_type'::regclass)
             WHERE c.oid = cmd.objid AND c.relkind <> 'c'
               AND EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                                                       AND cellcrypt._holds_encrypted(a.atttypid, ours))
        ) s;
        IF found IS NOT NULL THEN
            RAISE EXCEPTION 'pg_cellcrypt: % would hold encrypted values inside an array, a domain, a range or a composite type', found
                USING ERRCODE = 'feature_not_supported',
                      DETAIL = 'A key change re-encrypts the columns of the encrypted types themselves; values nested in other types would keep the old key and become unreadable when it is retired.',
                      HINT = 'Store each encrypted value in a column of an encrypted type (encrypted_text, encrypted_jsonb, ...).';
        END IF;
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION cellcrypt._check_ddl() FROM PUBLIC;
CREATE EVENT TRIGGER cellcrypt_check_ddl ON ddl_command_end EXECUTE FUNCTION cellcrypt._check_ddl();

-- Encryption is on from the start: the database gets its first key now.
SELECT cellcrypt._initialize();
"#,
    name = "first_key",
    finalize
);

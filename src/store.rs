//! Running SQL with rights other than the caller's, the safe way; and every statement on the
//! extension's own tables (`cellcrypt.keyring`, `cellcrypt.index_key`,
//! `cellcrypt.reencryption_job`).
//!
//! Two identities are ever borrowed, each the way PostgreSQL's own maintenance borrows them
//! (`vacuum.c`, `indexcmds.c` since CVE-2022-1552):
//!
//! * [`as_extension_owner`]: the role that owns the extension and its tables, for the
//!   extension's bookkeeping (reading and writing its own tables, and catalog queries);
//! * [`as_table_owner`]: the owner of a user table, for re-encryption's statements on it. Any
//!   code the owner attached to the table (triggers of every kind, index expressions, CHECK and
//!   domain constraints, generated columns, policies) then runs with the owner's rights only.
//!
//! Both run the body with:
//! * `search_path = pg_catalog, pg_temp`, in a GUC nesting level of its own, so no object or
//!   operator resolves to one another role created (pg_temp is never searched for functions or
//!   operators); the statements also qualify what they name;
//! * `SECURITY_RESTRICTED_OPERATION`, so the body cannot change the role or leave anything
//!   behind (temporary tables, prepared statements, cursors);
//! * the caller's identity and settings restored afterwards, also when the body raises (and
//!   by PostgreSQL itself when an error aborts the (sub)transaction).
//!
//! Nothing outside this module names `cellcrypt.keyring`, `cellcrypt.index_key`,
//! `cellcrypt.blind_index_column` or `cellcrypt.reencryption_job` in a statement.

use crate::backend_local::BackendLocal;
use crate::errors;
use cellcrypt_core::kdf::KdfParams;
use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode};
use std::cell::Cell;
use std::ffi::CStr;

/// The search_path every borrowed identity runs with.
pub const SAFE_SEARCH_PATH: &CStr = c"pg_catalog, pg_temp";

/// A GUC set for the body only: name and value.
type Setting = (&'static CStr, &'static CStr);

/// Runs `f` as `role`, with the pinned search_path, `SECURITY_RESTRICTED_OPERATION` and the
/// extra `settings`, all undone when `f` returns or raises.
fn run_as<R>(role: pg_sys::Oid, settings: &[Setting], f: impl FnOnce() -> R) -> R {
    let mut saved_user = pg_sys::InvalidOid;
    let mut saved_context = 0;
    // SAFETY: plain backend calls. The identity and the GUC level are restored in `finally`
    // (which also runs when `f` raises), and by PostgreSQL on (sub)transaction abort.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        pg_sys::SetUserIdAndSecContext(
            role,
            saved_context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32 | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
    }
    // SAFETY: a new GUC nesting level, popped below.
    let nest = unsafe { pg_sys::NewGUCNestLevel() };
    let f = Cell::new(Some(f));
    PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
        set_local(c"search_path", SAFE_SEARCH_PATH);
        // Citus hides its shards (ordinary tables on each node) from catalog queries outside its
        // own backends; the extension's bookkeeping and re-encryption must see them.
        if crate::citus::loaded() {
            set_local(c"citus.override_table_visibility", c"off");
        }
        for (name, value) in settings {
            set_local(name, value);
        }
        (f.take().expect("runs once"))()
    }))
    .finally(|| unsafe {
        // SAFETY: undoes exactly what was set above; a level already popped by an abort is
        // not popped again (AtEOXact_GUC only pops levels at or above `nest`).
        pg_sys::AtEOXact_GUC(false, nest);
        pg_sys::SetUserIdAndSecContext(saved_user, saved_context);
    })
    .execute()
}

/// Sets a GUC in the current nesting level only (restored when the level is popped). Allowed in
/// parallel workers too, as a function's SET clause is.
fn set_local(name: &CStr, value: &CStr) {
    // SAFETY: the arguments are valid C strings; errors are raised as usual.
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
    }
}

/// The OID of the extension, or InvalidOid while it does not exist.
pub fn extension_oid() -> pg_sys::Oid {
    // SAFETY: a catalog lookup by name; missing_ok.
    unsafe { pg_sys::get_extension_oid(c"pg_cellcrypt".as_ptr(), true) }
}

/// The extension's owner and schema, read from `pg_extension` once per backend and extension;
/// the bootstrap superuser and no schema while the extension does not exist.
fn extension_row() -> (pg_sys::Oid, pg_sys::Oid) {
    type Row = (pg_sys::Oid, pg_sys::Oid, pg_sys::Oid);
    static CACHE: BackendLocal<Cell<Row>> = BackendLocal::new(Cell::new((pg_sys::InvalidOid, pg_sys::InvalidOid, pg_sys::InvalidOid)));
    let ext = extension_oid();
    let bootstrap = pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID);
    if ext == pg_sys::InvalidOid {
        return (bootstrap, pg_sys::InvalidOid);
    }
    let (cached_ext, owner, schema) = CACHE.with(|c| c.get());
    if cached_ext == ext {
        return (owner, schema);
    }
    // SAFETY: a heap scan of pg_extension (a handful of rows) inside a transaction, as
    // PostgreSQL's own get_extension_schema does with its index.
    let (owner, schema) = unsafe {
        let rel = pg_sys::table_open(pg_sys::ExtensionRelationId, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        let mut found = (bootstrap, pg_sys::InvalidOid);
        loop {
            let tup = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tup.is_null() {
                break;
            }
            let row = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_extension>(tup);
            if (*row).oid == ext {
                found = ((*row).extowner, (*row).extnamespace);
                break;
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        found
    };
    CACHE.with(|c| c.set((ext, owner, schema)));
    (owner, schema)
}

/// The role that owns the extension (and so its tables).
pub fn extension_owner() -> pg_sys::Oid {
    extension_row().0
}

/// The schema of the extension's SQL objects (its types and functions).
pub fn extension_namespace() -> pg_sys::Oid {
    extension_row().1
}

/// Runs `f` as the extension's owner, the safe way (see the module documentation). Used for
/// the extension's own tables and for catalog queries: every role that writes encrypted
/// columns must be able to load the key without any privilege on the keyring.
pub fn as_extension_owner<R>(f: impl FnOnce() -> R) -> R {
    run_as(extension_owner(), &[], f)
}

/// What a table looks like to re-encryption, read under the lock it keeps to the end of the
/// transaction.
pub struct UserTable {
    pub relid: pg_sys::Oid,
    /// Schema-qualified and quoted; to use in a statement, take it inside [`with_stable_names`].
    pub name: String,
    pub owner: pg_sys::Oid,
}

/// Locks user table `relid` with `lockmode` (kept to the end of the transaction) and describes
/// it; None when it no longer exists or is no longer a plain table.
pub fn lock_user_table(relid: pg_sys::Oid, lockmode: u32) -> Option<UserTable> {
    lock_user_relation(relid, lockmode, b'r')
}

/// As [`lock_user_table`], for a permanent relation of kind `relkind` (`r`, or `m` for a
/// materialized view).
pub fn lock_user_relation(relid: pg_sys::Oid, lockmode: u32, relkind: u8) -> Option<UserTable> {
    // SAFETY: try_relation_open takes the lock and returns NULL for a dropped relation; the
    // relation is closed with NoLock, keeping the lock.
    unsafe {
        let rel = pg_sys::try_relation_open(relid, lockmode as pg_sys::LOCKMODE);
        if rel.is_null() {
            return None;
        }
        let form = &*(*rel).rd_rel;
        let plain = form.relkind as u8 == relkind && form.relpersistence as u8 != b't';
        let owner = form.relowner;
        pg_sys::relation_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        if !plain {
            return None;
        }
        let name = relation_name(relid)?;
        Some(UserTable { relid, name, owner })
    }
}

/// A relation's schema-qualified, quoted name as it is now.
fn relation_name(relid: pg_sys::Oid) -> Option<String> {
    as_extension_owner(|| Spi::get_one_with_args::<String>("SELECT $1::pg_catalog.regclass::pg_catalog.text", &[relid.into()]).ok().flatten())
}

/// Runs `f`, which names `table` (by `table.name`, taken again here) in statements it runs,
/// while no schema can be renamed: ALTER SCHEMA ... RENAME takes no lock on the schema, only
/// RowExclusiveLock on pg_namespace, which the share lock taken here holds off (a rename or a
/// move of the table itself waits for the table's own lock). The lock is released as soon as
/// `f` returns, so schema DDL elsewhere waits at most for one statement. Without `wait`, gives
/// None at once when schema DDL holds pg_namespace (the caller tries again later).
pub fn with_stable_names<R>(table: &mut UserTable, wait: bool, f: impl FnOnce(&UserTable) -> R) -> Option<R> {
    let ns = pg_sys::NamespaceRelationId;
    let mode = pg_sys::ShareLock as pg_sys::LOCKMODE;
    // SAFETY: a relation lock on a catalog, released below (and by PostgreSQL on abort).
    unsafe {
        if wait {
            pg_sys::LockRelationOid(ns, mode);
        } else if !pg_sys::ConditionalLockRelationOid(ns, mode) {
            return None;
        }
    }
    let f = Cell::new(Some(f));
    let r = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
        if let Some(name) = relation_name(table.relid) {
            table.name = name;
        }
        (f.take().expect("runs once"))(table)
    }))
    // SAFETY: releases the lock taken above.
    .finally(|| unsafe { pg_sys::UnlockRelationOid(ns, mode) })
    .execute();
    Some(r)
}

/// Runs `f` as the owner of `table`, the safe way (see the module documentation), with user
/// triggers of the ordinary kind off (`session_replication_role = replica`) and
/// `row_security = off`, so that a statement either sees every row or fails (a table whose
/// owner forced row level security on itself), never silently skips rows.
pub fn as_table_owner<R>(table: &UserTable, f: impl FnOnce() -> R) -> R {
    run_as(table.owner, &[(c"session_replication_role", c"replica"), (c"row_security", c"off")], f)
}

// ---------------------------------------------------------------------------------------------
// The keyring

/// One row of `cellcrypt.keyring`.
pub struct KeyRow {
    pub version: u32,
    pub fingerprint: String,
    pub salt: Vec<u8>,
    pub params: KdfParams,
    pub state: String,
    pub wrapped: Option<Vec<u8>>,
}

thread_local! {
    static INTERNAL_WRITE: Cell<bool> = const { Cell::new(false) };
}

/// True while this extension itself writes its key tables; rows written otherwise come from a
/// restore (see the keyring trigger in the install SQL).
pub fn internal_write_in_progress() -> bool {
    INTERNAL_WRITE.with(|w| w.get())
}

/// Runs a write to the key tables as the extension owner, marked as the extension's own.
fn write<R>(what: &str, f: impl FnOnce() -> Result<R, pgrx::spi::Error>) -> R {
    internally(f).unwrap_or_else(|e| errors::raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("could not {what}: {e}"), None, None))
}

/// Runs `f` as the extension owner, with its writes to the key tables marked as its own.
fn internally<R>(f: impl FnOnce() -> R) -> R {
    INTERNAL_WRITE.with(|w| w.set(true));
    PgTryBuilder::new(std::panic::AssertUnwindSafe(|| as_extension_owner(f))).finally(|| INTERNAL_WRITE.with(|w| w.set(false))).execute()
}

/// Runs a read of the extension's tables as the extension owner with the latest snapshot, as
/// catalogs are read: a key change that committed after this transaction began is seen,
/// whatever the isolation level. A parallel worker reads with the snapshot its leader shared.
pub fn read_latest<R>(f: impl FnOnce() -> R) -> R {
    as_extension_owner(|| latest_snapshot(f))
}

/// Runs `f` with the latest snapshot as the active one (not in parallel mode, where the
/// leader's snapshot is kept).
fn latest_snapshot<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: plain backend calls; the pushed snapshot is popped below (and on abort).
    if unsafe { pg_sys::IsInParallelMode() } {
        return f();
    }
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetLatestSnapshot()) };
    let r = f();
    unsafe { pg_sys::PopActiveSnapshot() };
    r
}

/// The keyring's live rows (current first, then previous versions, newest first).
pub fn key_rows() -> Vec<KeyRow> {
    read_latest(|| {
        Spi::connect(|client| {
            let rows = client.select(
                "SELECT key_version, fingerprint, kdf_salt, kdf_memory_kib, kdf_iterations, kdf_parallelism, state, wrapped_data_key \
                 FROM cellcrypt.keyring WHERE state OPERATOR(pg_catalog.=) ANY ('{current,previous}'::pg_catalog.text[]) \
                 ORDER BY state OPERATOR(pg_catalog.=) 'current' DESC, key_version DESC",
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
                    state: row.get::<String>(7)?.unwrap_or_default(),
                    wrapped: row.get::<Vec<u8>>(8)?,
                });
            }
            Ok::<_, pgrx::spi::Error>(out)
        })
    })
    .unwrap_or_else(|e| errors::raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("could not read the pg_cellcrypt keyring: {e}"), None, None))
}

/// Where the `file` provider last wrote this database's key file, as `cellcrypt.key_location`
/// records it: the cluster's system identifier, the database OID, the key directory, the OID of
/// the `key_location` table itself, and the system identifier and key directory before the
/// last change of system identifier.
pub struct KeyLocation {
    pub system_identifier: String,
    pub database_oid: pg_sys::Oid,
    pub key_directory: String,
    pub table_oid: pg_sys::Oid,
    pub previous: Option<(String, String)>,
}

impl KeyLocation {
    /// The (system identifier, key directory) pairs recorded, newest first.
    pub fn origins(&self) -> Vec<(String, String)> {
        let mut out = vec![(self.system_identifier.clone(), self.key_directory.clone())];
        out.extend(self.previous.clone());
        out
    }
}

const KEY_LOCATION_OID: &str = "'cellcrypt.key_location'::pg_catalog.regclass::pg_catalog.oid";

pub fn key_location() -> Option<KeyLocation> {
    read_latest(|| {
        Spi::connect(|c| {
            let t = c.select(
                "SELECT system_identifier, database_oid, key_directory, table_oid, previous_system_identifier, previous_key_directory \
                 FROM cellcrypt.key_location",
                None,
                &[],
            )?;
            let Some(r) = t.into_iter().next() else { return Ok(None) };
            let previous = match (r.get::<String>(5)?, r.get::<String>(6)?) {
                (Some(s), Some(d)) => Some((s, d)),
                _ => None,
            };
            Ok::<_, pgrx::spi::Error>(Some(KeyLocation {
                system_identifier: r.get::<String>(1)?.unwrap_or_default(),
                database_oid: r.get::<pg_sys::Oid>(2)?.unwrap_or(pg_sys::InvalidOid),
                key_directory: r.get::<String>(3)?.unwrap_or_default(),
                table_oid: r.get::<pg_sys::Oid>(4)?.unwrap_or(pg_sys::InvalidOid),
                previous,
            }))
        })
    })
    .ok()
    .flatten()
}

/// The location of this cluster's key file for this database.
pub fn this_key_location() -> KeyLocation {
    // SAFETY: plain reads of backend globals.
    let (sysid, dboid) = unsafe { (pg_sys::GetSystemIdentifier(), pg_sys::MyDatabaseId) };
    let table_oid = as_extension_owner(|| Spi::get_one::<pg_sys::Oid>(&format!("SELECT {KEY_LOCATION_OID}")))
        .ok()
        .flatten()
        .unwrap_or(pg_sys::InvalidOid);
    KeyLocation {
        system_identifier: sysid.to_string(),
        database_oid: dboid,
        key_directory: crate::gucs::key_directory().to_string_lossy().into_owned(),
        table_oid,
        previous: None,
    }
}

/// Records this cluster's key file location in `cellcrypt.key_location`, in the caller's
/// transaction; the location it replaces is kept as the previous one when the system
/// identifier changed (what a standby of an upgraded cluster may still need).
pub fn record_key_location() {
    let here = this_key_location();
    write("record where the key file is", || {
        Spi::run_with_args(
            &format!(
                "INSERT INTO cellcrypt.key_location (system_identifier, database_oid, key_directory, table_oid) VALUES ($1, $2, $3, {KEY_LOCATION_OID}) \
                 ON CONFLICT (one_row) DO UPDATE SET \
                     previous_system_identifier = CASE WHEN cellcrypt.key_location.system_identifier OPERATOR(pg_catalog.<>) EXCLUDED.system_identifier \
                         THEN cellcrypt.key_location.system_identifier ELSE cellcrypt.key_location.previous_system_identifier END, \
                     previous_key_directory = CASE WHEN cellcrypt.key_location.system_identifier OPERATOR(pg_catalog.<>) EXCLUDED.system_identifier \
                         THEN cellcrypt.key_location.key_directory ELSE cellcrypt.key_location.previous_key_directory END, \
                     system_identifier = EXCLUDED.system_identifier, database_oid = EXCLUDED.database_oid, \
                     key_directory = EXCLUDED.key_directory, table_oid = EXCLUDED.table_oid, recorded_at = pg_catalog.now()"
            ),
            &[here.system_identifier.into(), here.database_oid.into(), here.key_directory.into()],
        )
    })
}

/// The current data key version and blind-index key version, read-only (for standbys).
pub fn current_versions() -> (Option<u32>, Option<u32>) {
    read_latest(|| {
        Spi::connect(|c| {
            c.select(
                "SELECT (SELECT key_version FROM cellcrypt.keyring WHERE state OPERATOR(pg_catalog.=) 'current'), \
                        (SELECT key_version FROM cellcrypt.index_key WHERE state OPERATOR(pg_catalog.=) 'current')",
                None,
                &[],
            )?
            .first()
            .get_two::<i32, i32>()
        })
    })
    .map(|(a, b)| (a.map(|v| v as u32), b.map(|v| v as u32)))
    .unwrap_or((None, None))
}

/// True when the keyring has any row (the extension's first key exists).
pub fn keyring_has_rows() -> bool {
    as_extension_owner(|| Spi::get_one::<bool>("SELECT EXISTS (SELECT FROM cellcrypt.keyring)")).ok().flatten().unwrap_or(false)
}

/// The highest key version ever recorded (retired ones, and those a restore replaced, included).
pub fn max_key_version() -> Option<u32> {
    as_extension_owner(|| {
        Spi::get_one::<i32>(
            "SELECT pg_catalog.max(v) FROM (SELECT key_version FROM cellcrypt.keyring UNION ALL \
             SELECT (key_row OPERATOR(pg_catalog.->>) 'key_version')::pg_catalog.int4 FROM cellcrypt.replaced_key_row \
              WHERE table_name OPERATOR(pg_catalog.=) 'keyring') t(v)",
        )
    })
    .ok()
    .flatten()
    .map(|v| v as u32)
}

/// The current key's row as the status view shows it.
pub type CurrentKeyStatus = (Option<i32>, Option<String>, Option<pgrx::datum::TimestampWithTimeZone>, Option<String>, Option<i64>);

pub fn current_key_status() -> CurrentKeyStatus {
    as_extension_owner(|| {
        Spi::connect(|c| {
            let t = c.select(
                "SELECT key_version, fingerprint, created_at, created_by::pg_catalog.text, reencrypted_values FROM cellcrypt.keyring \
                 WHERE state OPERATOR(pg_catalog.=) 'current'",
                None,
                &[],
            )?;
            for r in t {
                return Ok::<CurrentKeyStatus, pgrx::spi::Error>((r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?));
            }
            Ok((None, None, None, None, None))
        })
        .unwrap_or((None, None, None, None, None))
    })
}

/// Marks `version` as a previous version whose data key is `wrapped` under the new current key.
pub fn demote_key(version: u32, wrapped: Vec<u8>) {
    write("update the keyring", || {
        Spi::run_with_args(
            "UPDATE cellcrypt.keyring SET state = 'previous', wrapped_data_key = $2 WHERE key_version OPERATOR(pg_catalog.=) $1",
            &[(version as i32).into(), wrapped.into()],
        )
    })
}

/// Records a new current key version.
/// Rows that arrived from a dump become the database's own once a key call has used them (a
/// restore of their key, or a change): a later restore from another dump then treats them as
/// the rows in place.
pub fn settle_restored_rows() {
    write("settle the restored key rows", || {
        Spi::run(
            "UPDATE cellcrypt.keyring SET restored = false, restored_by = NULL WHERE restored_by IS NOT NULL OR restored; \
             UPDATE cellcrypt.index_key SET restored = false, restored_by = NULL WHERE restored_by IS NOT NULL OR restored",
        )
    })
}

pub fn insert_current_key(version: u32, fingerprint: &str, salt: &[u8], params: &KdfParams, provider: &str) {
    write("record the key", || {
        Spi::run_with_args(
            "INSERT INTO cellcrypt.keyring (key_version, fingerprint, kdf_salt, kdf_memory_kib, kdf_iterations, kdf_parallelism, state, provider) \
             VALUES ($1, $2, $3, $4, $5, $6, 'current', $7)",
            &[
                (version as i32).into(),
                fingerprint.into(),
                salt.to_vec().into(),
                (params.m_cost_kib as i32).into(),
                (params.t_cost as i32).into(),
                (params.p_cost as i32).into(),
                provider.into(),
            ],
        )
    })
}

// ---------------------------------------------------------------------------------------------
// The blind-index key

/// The current blind-index key row: (version, wrapped key, data key version it is wrapped under).
pub fn index_key_row() -> Option<(u32, Vec<u8>, u32)> {
    // A read-only SPI connection: parallel workers load keys too, and may not assign an XID.
    read_latest(|| {
        Spi::connect(|c| {
            let t = c.select(
                "SELECT key_version, wrapped_key, wrapped_under FROM cellcrypt.index_key WHERE state OPERATOR(pg_catalog.=) 'current'",
                None,
                &[],
            )?;
            let mut out = None;
            for r in t {
                out = match (r.get::<i32>(1)?, r.get::<Vec<u8>>(2)?, r.get::<i32>(3)?) {
                    (Some(v), Some(w), Some(u)) => Some((v as u32, w, u as u32)),
                    _ => None,
                };
            }
            Ok::<_, pgrx::spi::Error>(out)
        })
        .ok()
        .flatten()
    })
}

/// Stores blind-index key `version`, wrapped under data key `under`: inserted as the current
/// index key, or re-wrapped in place.
pub fn store_index_key(version: u32, wrapped: Vec<u8>, under: u32, insert: bool) {
    let sql = if insert {
        "INSERT INTO cellcrypt.index_key (key_version, wrapped_key, wrapped_under, state) VALUES ($1, $2, $3, 'current')"
    } else {
        "UPDATE cellcrypt.index_key SET wrapped_key = $2, wrapped_under = $3 WHERE key_version OPERATOR(pg_catalog.=) $1"
    };
    write("store the blind-index key", || Spi::run_with_args(sql, &[(version as i32).into(), wrapped.into(), (under as i32).into()]))
}

/// Retires the current blind-index key (its wrapped key is deleted).
pub fn retire_index_key() {
    write("retire the blind-index key", || {
        Spi::run("UPDATE cellcrypt.index_key SET state = 'retired', wrapped_key = NULL WHERE state OPERATOR(pg_catalog.=) 'current'")
    })
}

// ---------------------------------------------------------------------------------------------
// Blind-index registrations

/// The next blind-index column id, from a sequence: never reused, even when a registration
/// rolls back (a backend may have cached the normalization of the id it used).
pub fn next_blind_index_id() -> u32 {
    as_extension_owner(|| Spi::get_one::<i64>("SELECT pg_catalog.nextval('cellcrypt.blind_index_column_id'::pg_catalog.regclass)"))
        .unwrap_or_else(|e| {
            errors::raise(
                PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                format!("could not allocate a blind-index column id: {e}"),
                Some("A database registers at most 65535 blind-index columns over its life."),
                None,
            )
        })
        .unwrap_or(0) as u32
}

/// True when the relation is part of an inheritance tree or a partition tree.
pub fn in_inheritance_tree(relid: pg_sys::Oid) -> bool {
    as_extension_owner(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_inherits WHERE inhrelid OPERATOR(pg_catalog.=) $1 OR inhparent OPERATOR(pg_catalog.=) $1)",
            &[relid.into()],
        )
    })
    .ok()
    .flatten()
    .unwrap_or(true)
}

/// Records a registered column.
pub fn insert_blind_index_column(id: u32, normalization: &str, table: &str, column: &str) {
    write("register the column", || {
        Spi::run_with_args(
            "INSERT INTO cellcrypt.blind_index_column (id, normalization, table_name, column_name) VALUES ($1, $2, $3, $4)",
            &[(id as i32).into(), normalization.into(), table.into(), column.into()],
        )
    })
}

/// The normalization of registered column `id`.
pub fn blind_index_normalization(id: u32) -> Option<String> {
    // A read-only connection: lookups run on standbys and in parallel workers, where no
    // transaction id can be assigned.
    read_latest(|| {
        Spi::connect(|c| {
            c.select("SELECT normalization FROM cellcrypt.blind_index_column WHERE id OPERATOR(pg_catalog.=) $1", None, &[(id as i32).into()])?
                .first()
                .get_one::<String>()
        })
    })
    .ok()
    .flatten()
}

// ---------------------------------------------------------------------------------------------
// Re-encryption jobs

/// One job: a table whose encrypted columns are being moved to `version`.
pub struct Job {
    pub relid: pg_sys::Oid,
    pub version: i32,
    pub columns: Vec<String>,
    pub next_block: i64,
    pub total_blocks: i64,
}

fn job_error(what: &'static str) -> impl Fn(pgrx::spi::Error) -> String {
    move |e| format!("{what}: {e}")
}

/// The columns of encrypted types, per relation of the given kinds, as `SELECT relid, columns`.
/// The encrypted types are the extension's member types that are base types: PostgreSQL 17+
/// also records the array and row types of an extension's types and tables as its members.
fn encrypted_columns_sql(relkinds: &str) -> String {
    format!(
        "SELECT c.oid, pg_catalog.array_agg(pg_catalog.quote_ident(a.attname) ORDER BY a.attnum) \
         FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) a.attrelid \
         WHERE a.atttypid OPERATOR(pg_catalog.=) ANY (SELECT d.objid FROM pg_catalog.pg_depend d \
                              JOIN pg_catalog.pg_type y ON y.oid OPERATOR(pg_catalog.=) d.objid \
                              WHERE d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_extension'::pg_catalog.regclass \
                                AND d.refobjid OPERATOR(pg_catalog.=) $2 \
                                AND d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_type'::pg_catalog.regclass \
                                AND d.deptype OPERATOR(pg_catalog.=) 'e' \
                                AND y.typtype OPERATOR(pg_catalog.=) 'b' AND y.typelem OPERATOR(pg_catalog.=) 0) \
           AND c.relkind OPERATOR(pg_catalog.=) ANY ('{{{relkinds}}}'::pg_catalog.\"char\"[]) \
           AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped AND c.relispopulated{} \
         GROUP BY c.oid",
        citus_shell_filter()
    )
}

/// With Citus in the database: leaves out its distributed and reference tables, which hold no
/// rows here (their shards, ordinary tables on each node, do). Each node re-encrypts its own.
fn citus_shell_filter() -> &'static str {
    // SAFETY: a catalog lookup by name; missing_ok.
    if crate::citus::loaded() && unsafe { pg_sys::get_extension_oid(c"citus".as_ptr(), true) } != pg_sys::InvalidOid {
        " AND NOT EXISTS (SELECT FROM pg_catalog.pg_dist_partition p WHERE p.logicalrelid OPERATOR(pg_catalog.=) c.oid)"
    } else {
        ""
    }
}

/// Records one job per table with encrypted columns (every schema, partitions included,
/// temporary tables excepted) that has none yet, and sends a table whose encrypted columns
/// changed since its job was made back for a pass over all of them. Returns how many.
pub fn create_jobs(version: u32) -> i64 {
    let sql = format!(
        "INSERT INTO cellcrypt.reencryption_job (relid, key_version, columns) \
         SELECT t.oid, $1, t.columns FROM ({}) t(oid, columns) \
         WHERE (SELECT relpersistence FROM pg_catalog.pg_class WHERE oid OPERATOR(pg_catalog.=) t.oid) OPERATOR(pg_catalog.<>) 't' \
         ON CONFLICT (relid) DO UPDATE SET columns = EXCLUDED.columns, state = 'pending', next_block = 0, total_blocks = 0, \
                pass = cellcrypt.reencryption_job.pass OPERATOR(pg_catalog.+) 1 \
         WHERE cellcrypt.reencryption_job.columns OPERATOR(pg_catalog.<>) EXCLUDED.columns",
        encrypted_columns_sql("r")
    );
    as_extension_owner(|| {
        Spi::connect_mut(|c| c.update(&sql, None, &[(version as i32).into(), extension_oid().into()]).map(|t| t.len() as i64))
    })
    .unwrap_or_else(|e| errors::raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("could not plan the re-encryption: {e}"), None, None))
}

thread_local! {
    static RESTORE_CHECK: Cell<bool> = const { Cell::new(false) };
}

/// True while [`relation_with_live_values`] reads a table: `cellcrypt.opens()` works only then.
pub fn in_restore_check() -> bool {
    RESTORE_CHECK.with(|c| c.get())
}

fn in_restore_check_scope<R>(f: impl FnOnce() -> R) -> R {
    RESTORE_CHECK.with(|c| c.set(true));
    PgTryBuilder::new(std::panic::AssertUnwindSafe(f)).finally(|| RESTORE_CHECK.with(|c| c.set(false))).execute()
}

/// The first table or materialized view (by name) holding a value under one of `versions` that
/// opens under the keys in use: data that the keyring rows in place are needed for. Each
/// relation is read as its owner, `ONLY`, without row security (a read fires no trigger), under
/// a SHARE lock kept to the end of the transaction; temporary tables are not looked at (see
/// [`restore_blockers`]).
pub fn relation_with_live_values(versions: &[i32]) -> Option<String> {
    let sql = encrypted_columns_sql("r,m");
    let relations: Vec<(pg_sys::Oid, Vec<String>)> = as_extension_owner(|| {
        Spi::connect(|c| {
            let mut out = Vec::new();
            for r in c.select(&sql, None, &[0.into(), extension_oid().into()])? {
                out.push((r.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::InvalidOid), r.get::<Vec<String>>(2)?.unwrap_or_default()));
            }
            Ok::<_, pgrx::spi::Error>(out)
        })
    })
    .unwrap_or_else(|e| errors::raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("could not list encrypted columns: {e}"), None, None));
    // One order for every restoring session: two of them (pg_restore -j) never wait on each
    // other in a cycle.
    let mut relations = relations;
    relations.sort_by_key(|(relid, _)| relid.to_u32());
    for (relid, columns) in relations {
        // SHARE: writers wait, from here to this transaction's end; none can add a value under
        // the keys in place after its table was looked at.
        let lock = pg_sys::ShareLock;
        let Some(mut rel) = lock_user_relation(relid, lock, b'r').or_else(|| lock_user_relation(relid, lock, b'm')) else {
            continue;
        };
        let condition = columns
            .iter()
            .map(|c| format!("(cellcrypt.key_version({c}) OPERATOR(pg_catalog.=) ANY ($1) AND cellcrypt.opens({c}))"))
            .collect::<Vec<_>>()
            .join(" OR ");
        // Read with a snapshot taken once the lock is held: a value committed after the
        // restoring statement began is seen.
        let found = with_stable_names(&mut rel, true, |t| {
            as_table_owner(t, || {
                in_restore_check_scope(|| {
                    latest_snapshot(|| {
                        Spi::get_one_with_args::<bool>(
                            &format!("SELECT EXISTS (SELECT FROM ONLY {} WHERE {condition})", t.name),
                            &[versions.to_vec().into()],
                        )
                    })
                })
            })
        })
        .expect("waits for the lock")
        .unwrap_or_else(|e| errors::raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("could not read {}: {e}", rel.name), None, None));
        if found == Some(true) {
            return Some(rel.name);
        }
    }
    None
}

/// Places that may hold values no statement of this session can read: temporary tables with
/// encrypted columns (with `others_only`, other sessions' ones) and this database's prepared
/// transactions. Run as the extension owner.
fn unreadable_places(others_only: bool) -> Result<Vec<String>, pgrx::spi::Error> {
    let others = if others_only {
        " AND (SELECT relnamespace FROM pg_catalog.pg_class WHERE oid OPERATOR(pg_catalog.=) t.oid) OPERATOR(pg_catalog.<>) pg_catalog.pg_my_temp_schema()"
    } else {
        ""
    };
    let temp = format!(
        "SELECT pg_catalog.string_agg(pg_catalog.format('temporary table %s', t.oid::pg_catalog.regclass), ', ') FROM ({}) t(oid, columns) \
         WHERE (SELECT relpersistence FROM pg_catalog.pg_class WHERE oid OPERATOR(pg_catalog.=) t.oid) OPERATOR(pg_catalog.=) 't'{others}",
        encrypted_columns_sql("r")
    );
    let temp = Spi::get_one_with_args::<String>(&temp, &[0.into(), extension_oid().into()])?;
    let prepared = Spi::get_one::<String>(
        "SELECT pg_catalog.string_agg(pg_catalog.format('prepared transaction %L', gid), ', ') FROM pg_catalog.pg_prepared_xacts \
         WHERE database OPERATOR(pg_catalog.=) pg_catalog.current_database()",
    )?;
    Ok([temp, prepared].into_iter().flatten().collect())
}

/// What a restore cannot look into and so must not replace the keyring under: prepared
/// transactions of this database and other sessions' temporary tables with encrypted columns.
pub fn restore_blockers() -> Option<String> {
    as_extension_owner(|| unreadable_places(true))
        .map(|reasons| (!reasons.is_empty()).then(|| reasons.join(", ")))
        .unwrap_or_else(|e| errors::raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("could not check what a restore would miss: {e}"), None, None))
}

/// The keyring versions in use (current and previous): what data written here may need. With
/// `restored_too` false, only the ones the database made itself (or that a key call has used
/// since they were restored): rows a restore brought (this one, or another session of the same
/// `pg_restore -j`) are left out.
pub fn live_key_versions(restored_too: bool) -> Vec<i32> {
    as_extension_owner(|| {
        Spi::get_one_with_args::<Vec<i32>>(
            "SELECT pg_catalog.array_agg(key_version) FROM cellcrypt.keyring \
             WHERE ($1 OR NOT restored) AND state OPERATOR(pg_catalog.=) ANY ('{current,previous}'::pg_catalog.text[])",
            &[restored_too.into()],
        )
    })
    .ok()
    .flatten()
    .unwrap_or_default()
}

/// What keeps older key versions from being retired although every job is done, if anything:
/// temporary tables with encrypted columns (other sessions' data, which no one else can read),
/// prepared transactions, and transactions that began before the last table's pass ended.
pub fn retirement_waits_for() -> Result<Option<String>, String> {
    as_extension_owner(|| {
        // Order matters: a transaction that PREPAREs meanwhile becomes a valid prepared
        // transaction before its process's xact_start is cleared, so reading the processes
        // (fresh, not this transaction's cached statistics) before the prepared transactions
        // sees it in one or the other. The other order could miss it in between.
        Spi::run("SELECT pg_catalog.pg_stat_clear_snapshot()")?;
        let older = Spi::get_one_with_args::<String>(
            "SELECT CASE WHEN pg_catalog.count(*) OPERATOR(pg_catalog.>) 0 THEN \
                    pg_catalog.format('transactions of processes %s, which began before the last table''s pass ended,', \
                    pg_catalog.string_agg(pid::pg_catalog.text, ', ' ORDER BY pid)) END \
             FROM pg_catalog.pg_stat_activity \
             WHERE datid OPERATOR(pg_catalog.=) $1 AND pid OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid() AND xact_start IS NOT NULL \
               AND backend_type OPERATOR(pg_catalog.<>) 'autovacuum worker' \
               AND xact_start OPERATOR(pg_catalog.<) (SELECT COALESCE(pg_catalog.max(verified_at), pg_catalog.clock_timestamp()) FROM cellcrypt.reencryption_job)",
            // SAFETY: a backend global.
            &[unsafe { pg_sys::MyDatabaseId }.into()],
        )?;
        let mut reasons = unreadable_places(false)?;
        reasons.extend(older);
        Ok::<_, pgrx::spi::Error>((!reasons.is_empty()).then(|| reasons.join(", ")))
    })
    .map_err(job_error("could not check what retirement waits for"))
}

/// The materialized views with encrypted columns: (relid, columns).
pub fn materialized_views() -> Result<Vec<(pg_sys::Oid, Vec<String>)>, String> {
    let sql = encrypted_columns_sql("m");
    as_extension_owner(|| {
        Spi::connect(|c| {
            let mut out = Vec::new();
            for r in c.select(&sql, None, &[0.into(), extension_oid().into()])? {
                out.push((r.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::InvalidOid), r.get::<Vec<String>>(2)?.unwrap_or_default()));
            }
            Ok::<_, pgrx::spi::Error>(out)
        })
    })
    .map_err(job_error("could not list materialized views"))
}

/// Stamps the start of the work on jobs that have not started.
pub fn start_jobs() -> Result<(), String> {
    as_extension_owner(|| {
        Spi::run("UPDATE cellcrypt.reencryption_job SET started_at = pg_catalog.clock_timestamp() WHERE started_at IS NULL")
    })
    .map_err(job_error("could not start the re-encryption"))
}

/// Claims the next pending job for this transaction (`FOR UPDATE SKIP LOCKED`: two runners
/// never take the same one).
pub fn claim_job() -> Result<Option<Job>, String> {
    as_extension_owner(|| {
        Spi::connect_mut(|c| {
            let t = c.update(
                "SELECT relid, key_version, columns, next_block, total_blocks FROM cellcrypt.reencryption_job \
                 WHERE state OPERATOR(pg_catalog.=) 'pending' ORDER BY relid LIMIT 1 FOR UPDATE SKIP LOCKED",
                None,
                &[],
            )?;
            let mut job = None;
            for r in t {
                job = Some(Job {
                    relid: r.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::InvalidOid),
                    version: r.get::<i32>(2)?.unwrap_or(0),
                    columns: r.get::<Vec<String>>(3)?.unwrap_or_default(),
                    next_block: r.get::<i64>(4)?.unwrap_or(0),
                    total_blocks: r.get::<i64>(5)?.unwrap_or(0),
                });
            }
            Ok::<_, pgrx::spi::Error>(job)
        })
    })
    .map_err(job_error("could not read the re-encryption jobs"))
}

/// (pending jobs, all jobs).
pub fn job_counts() -> Result<(i64, i64), String> {
    as_extension_owner(|| {
        Spi::get_two::<i64, i64>(
            "SELECT pg_catalog.count(*) FILTER (WHERE state OPERATOR(pg_catalog.=) 'pending'), pg_catalog.count(*) FROM cellcrypt.reencryption_job",
        )
    })
    .map(|(a, b)| (a.unwrap_or(0), b.unwrap_or(0)))
    .map_err(job_error("could not read the re-encryption jobs"))
}

/// (verified jobs, all jobs, the reasons of blocked jobs), read-only (for standbys too).
pub fn job_summary() -> (Option<i64>, Option<i64>, Option<String>) {
    as_extension_owner(|| {
        Spi::connect(|c| {
            c.select(
                "SELECT pg_catalog.count(*) FILTER (WHERE state OPERATOR(pg_catalog.=) 'verified'), pg_catalog.count(*), \
                        pg_catalog.string_agg(DISTINCT last_error, '; ') FROM cellcrypt.reencryption_job",
                None,
                &[],
            )?
            .first()
            .get_three::<i64, i64, String>()
        })
        .unwrap_or((None, None, None))
    })
}

/// Who started the running change and how far it is, when jobs are left.
pub fn running_change() -> Option<String> {
    as_extension_owner(|| {
        Spi::get_one::<String>(
            "SELECT pg_catalog.format('the change to key version %s started by role %s at %s: %s of %s tables done, %s values re-encrypted so far', \
                    pg_catalog.max(key_version), pg_catalog.min(created_by), pg_catalog.min(created_at), \
                    pg_catalog.count(*) FILTER (WHERE state OPERATOR(pg_catalog.=) 'verified'), pg_catalog.count(*), pg_catalog.sum(cells_done)) \
             FROM cellcrypt.reencryption_job HAVING pg_catalog.count(*) OPERATOR(pg_catalog.>) 0",
        )
        .ok()
        .flatten()
    })
}

/// True when re-encryption has work: jobs, or previous key versions to plan it for.
pub fn has_reencryption_work() -> bool {
    // On a Citus node older versions stay (see `keep_previous_keys`): only jobs are work.
    let sql = if keep_previous_keys() {
        "SELECT EXISTS (SELECT FROM cellcrypt.reencryption_job)"
    } else {
        "SELECT EXISTS (SELECT FROM cellcrypt.reencryption_job) \
             OR EXISTS (SELECT FROM cellcrypt.keyring WHERE state OPERATOR(pg_catalog.=) 'previous')"
    };
    as_extension_owner(|| Spi::get_one::<bool>(sql))
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// True when the keyring holds previous versions (re-encryption has work or must plan it).
pub fn has_previous_keys() -> Result<bool, String> {
    as_extension_owner(|| Spi::get_one::<bool>("SELECT EXISTS (SELECT FROM cellcrypt.keyring WHERE state OPERATOR(pg_catalog.=) 'previous')"))
        .map(|b| b.unwrap_or(false))
        .map_err(job_error("could not read the keyring"))
}

/// Records a verified placeholder job when planning found no table, so that the finish step
/// runs and retires the older versions.
pub fn plan_nothing_left() -> Result<(), String> {
    as_extension_owner(|| {
        Spi::run(
            "INSERT INTO cellcrypt.reencryption_job (relid, key_version, columns, state, verified_at) \
             SELECT 0, 0, '{}', 'verified', pg_catalog.clock_timestamp() WHERE NOT EXISTS (SELECT FROM cellcrypt.reencryption_job)",
        )
    })
    .map_err(job_error("could not plan the re-encryption"))
}

/// Forgets the job of a table that was dropped.
pub fn drop_job(relid: pg_sys::Oid) -> Result<(), String> {
    as_extension_owner(|| Spi::run_with_args("DELETE FROM cellcrypt.reencryption_job WHERE relid OPERATOR(pg_catalog.=) $1", &[relid.into()]))
        .map_err(job_error("could not drop a job"))
}

/// Marks a table's pass as done.
pub fn job_verified(relid: pg_sys::Oid) -> Result<(), String> {
    as_extension_owner(|| {
        Spi::run_with_args(
            "UPDATE cellcrypt.reencryption_job SET state = 'verified', updated_at = pg_catalog.clock_timestamp(), verified_at = pg_catalog.clock_timestamp() \
             WHERE relid OPERATOR(pg_catalog.=) $1",
            &[relid.into()],
        )
    })
    .map_err(job_error("could not record progress"))
}

/// Records why a table's batch cannot be done (shown by the status and progress views).
pub fn job_blocked(relid: pg_sys::Oid, reason: String) -> Result<(), String> {
    as_extension_owner(|| {
        Spi::run_with_args(
            "UPDATE cellcrypt.reencryption_job SET last_error = $2, updated_at = pg_catalog.clock_timestamp() WHERE relid OPERATOR(pg_catalog.=) $1",
            &[relid.into(), reason.into()],
        )
    })
    .map_err(job_error("could not record progress"))
}

/// Records on every job why the work cannot finish yet (shown by the status view).
pub fn jobs_note(reason: String) -> Result<(), String> {
    as_extension_owner(|| Spi::run_with_args("UPDATE cellcrypt.reencryption_job SET last_error = $1, updated_at = pg_catalog.clock_timestamp()", &[reason.into()]))
        .map_err(job_error("could not record progress"))
}

/// Records a batch done: the next block, the pass's size and the values moved.
pub fn job_progress(relid: pg_sys::Oid, next_block: i64, total_blocks: i64, cells: i64) -> Result<(), String> {
    as_extension_owner(|| {
        Spi::run_with_args(
            "UPDATE cellcrypt.reencryption_job SET next_block = $2, total_blocks = $3, cells_done = cells_done OPERATOR(pg_catalog.+) $4, \
                    last_error = NULL, updated_at = pg_catalog.clock_timestamp() WHERE relid OPERATOR(pg_catalog.=) $1",
            &[relid.into(), next_block.into(), total_blocks.into(), cells.into()],
        )
    })
    .map_err(job_error("could not record progress"))
}

/// Sends a table back for another pass (values under an older key were found).
pub fn job_again(relid: pg_sys::Oid) -> Result<(), String> {
    as_extension_owner(|| {
        Spi::run_with_args(
            "UPDATE cellcrypt.reencryption_job SET state = 'pending', next_block = 0, total_blocks = 0, pass = pass OPERATOR(pg_catalog.+) 1 \
             WHERE relid OPERATOR(pg_catalog.=) $1",
            &[relid.into()],
        )
    })
    .map_err(job_error("could not record progress"))
}

/// Locks every job row for this transaction; true when this runner holds them all (only one
/// runner finishes).
pub fn lock_all_jobs() -> Result<bool, String> {
    as_extension_owner(|| {
        Spi::connect_mut(|c| {
            let t = c.update("SELECT pg_catalog.count(*) FROM (SELECT FROM cellcrypt.reencryption_job FOR UPDATE SKIP LOCKED) s", None, &[])?;
            let locked = t.first().get_one::<i64>()?.unwrap_or(0);
            let total = c.select("SELECT pg_catalog.count(*) FROM cellcrypt.reencryption_job", None, &[])?.first().get_one::<i64>()?.unwrap_or(0);
            Ok::<_, pgrx::spi::Error>(locked >= total)
        })
    })
    .map_err(job_error("could not lock the re-encryption jobs"))
}

/// The jobs of tables that still exist: (relid, version, columns).
pub fn live_jobs() -> Result<Vec<(pg_sys::Oid, i32, Vec<String>)>, String> {
    as_extension_owner(|| {
        Spi::connect(|c| {
            let t = c.select(
                "SELECT relid, key_version, columns FROM cellcrypt.reencryption_job \
                 WHERE relid OPERATOR(pg_catalog.=) ANY (SELECT oid FROM pg_catalog.pg_class)",
                None,
                &[],
            )?;
            let mut out = Vec::new();
            for r in t {
                out.push((r.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::InvalidOid), r.get::<i32>(2)?.unwrap_or(0), r.get::<Vec<String>>(3)?.unwrap_or_default()));
            }
            Ok::<_, pgrx::spi::Error>(out)
        })
    })
    .map_err(job_error("could not read the re-encryption jobs"))
}

/// Every value is under the current key: records the count, retires the older versions (their
/// wrapped keys are deleted) and clears the jobs. Returns (retired versions, values moved,
/// current version, its fingerprint).
pub fn retire_previous_keys() -> Result<(Option<String>, Option<i64>, Option<i32>, Option<String>), String> {
    internally(|| {
        let (retired, cells) = Spi::get_two::<String, i64>(
            "SELECT (SELECT pg_catalog.string_agg(key_version::pg_catalog.text, ', ' ORDER BY key_version) FROM cellcrypt.keyring \
                     WHERE state OPERATOR(pg_catalog.=) 'previous'), \
                    (SELECT pg_catalog.sum(cells_done)::pg_catalog.int8 FROM cellcrypt.reencryption_job)",
        )?;
        let (version, fingerprint) =
            Spi::get_two::<i32, String>("SELECT key_version, fingerprint FROM cellcrypt.keyring WHERE state OPERATOR(pg_catalog.=) 'current'")?;
        Spi::run_with_args(
            "UPDATE cellcrypt.keyring SET reencrypted_values = COALESCE(reencrypted_values, 0) OPERATOR(pg_catalog.+) $1 \
             WHERE state OPERATOR(pg_catalog.=) 'current'",
            &[cells.unwrap_or(0).into()],
        )?;
        // On a Citus cluster values move between nodes (INSERT ... SELECT, shard moves), so no
        // node may decide alone that no value needs an older key: the older versions stay,
        // wrapped under the current key, and the next change wraps them again (citus.rs).
        if !keep_previous_keys() {
            Spi::run("UPDATE cellcrypt.keyring SET state = 'retired', wrapped_data_key = NULL WHERE state OPERATOR(pg_catalog.=) 'previous'")?;
        }
        Spi::run("DELETE FROM cellcrypt.reencryption_job")?;
        Ok::<_, pgrx::spi::Error>((if keep_previous_keys() { None } else { retired }, cells, version, fingerprint))
    })
    .map_err(job_error("could not retire old keys"))
}

/// True on a node of a Citus cluster: older key versions are kept there (see
/// [`retire_previous_keys`]).
pub fn keep_previous_keys() -> bool {
    crate::citus::citus_in_database()
}

/// The extension's schema, quoted, as it is named now (call it with the pg_namespace lock of
/// [`lock_user_relation`] held, so that the name stays this schema's until the end of the
/// transaction).
pub fn extension_schema() -> String {
    // SAFETY: a syscache lookup of the extension's namespace; NULL for none.
    unsafe {
        let name = pg_sys::get_namespace_name(extension_namespace());
        if name.is_null() {
            errors::raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, "pg_cellcrypt's schema does not exist", None, None)
        }
        CStr::from_ptr(pg_sys::quote_identifier(name)).to_string_lossy().into_owned()
    }
}

// ---------------------------------------------------------------------------------------------
// Citus (citus.rs): the key tables shared by a coordinator with its workers

/// This database's place in its Citus cluster, from Citus' metadata: a worker when its local
/// group is not the coordinator's (0), the coordinator when other primary nodes are registered.
pub fn citus_role() -> Option<crate::citus::Role> {
    as_extension_owner(|| {
        Spi::get_one::<String>(
            "SELECT CASE WHEN (SELECT g.groupid FROM pg_catalog.pg_dist_local_group g) OPERATOR(pg_catalog.<>) 0 THEN 'worker' \
                         WHEN EXISTS (SELECT FROM pg_catalog.pg_dist_node n WHERE n.groupid OPERATOR(pg_catalog.<>) 0 \
                                      AND n.noderole OPERATOR(pg_catalog.=) 'primary') THEN 'coordinator' \
                         ELSE 'alone' END",
        )
    })
    .ok()
    .flatten()
    .map(|r| match r.as_str() {
        "worker" => crate::citus::Role::Worker,
        "coordinator" => crate::citus::Role::Coordinator,
        _ => crate::citus::Role::Alone,
    })
}

/// The primary workers registered on this coordinator.
pub fn citus_worker_count() -> usize {
    as_extension_owner(|| {
        Spi::get_one::<i64>(
            "SELECT pg_catalog.count(*) FROM pg_catalog.pg_dist_node n \
             WHERE n.groupid OPERATOR(pg_catalog.<>) 0 AND n.noderole OPERATOR(pg_catalog.=) 'primary'",
        )
    })
    .ok()
    .flatten()
    .unwrap_or(0) as usize
}

/// The key tables as JSON arrays (keyring, index_key, blind_index_column), in key order: what a
/// coordinator shares with its workers. Public material only (fingerprints, salts, wrapped keys).
pub fn key_tables_as_json() -> (String, String, String) {
    let q = |sql: &str| -> String {
        as_extension_owner(|| Spi::get_one::<String>(sql))
            .unwrap_or_else(|e| errors::raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("could not read the key tables: {e}"), None, None))
            .unwrap_or_else(|| "[]".to_owned())
    };
    (
        q("SELECT pg_catalog.jsonb_agg(pg_catalog.to_jsonb(k) OPERATOR(pg_catalog.-) '{restored,restored_by}'::pg_catalog.text[] ORDER BY k.key_version)::pg_catalog.text FROM cellcrypt.keyring k"),
        q("SELECT pg_catalog.jsonb_agg(pg_catalog.to_jsonb(k) OPERATOR(pg_catalog.-) '{restored,restored_by}'::pg_catalog.text[] ORDER BY k.key_version)::pg_catalog.text FROM cellcrypt.index_key k"),
        q("SELECT pg_catalog.jsonb_agg(pg_catalog.to_jsonb(c) ORDER BY c.id)::pg_catalog.text FROM cellcrypt.blind_index_column c"),
    )
}

/// Inserts the coordinator's rows (JSON arrays, as [`key_tables_as_json`] makes them) into
/// `cellcrypt.keyring` and `cellcrypt.index_key`, inside an internal write.
fn insert_key_tables_from_json(keyring: &str, index_key: &str) -> Result<(), pgrx::spi::Error> {
    let cols = "key_version, fingerprint, kdf_salt, kdf_memory_kib, kdf_iterations, kdf_parallelism, state, provider, created_at, created_by, wrapped_data_key, reencrypted_values";
    let icols = "key_version, wrapped_key, wrapped_under, state, created_at, created_by";
    Spi::run_with_args(
        &format!("INSERT INTO cellcrypt.keyring ({cols}) SELECT {cols} FROM pg_catalog.jsonb_populate_recordset(NULL::cellcrypt.keyring, $1::pg_catalog.jsonb)"),
        &[keyring.into()],
    )?;
    Spi::run_with_args(
        &format!("INSERT INTO cellcrypt.index_key ({icols}) SELECT {icols} FROM pg_catalog.jsonb_populate_recordset(NULL::cellcrypt.index_key, $1::pg_catalog.jsonb)"),
        &[index_key.into()],
    )
}

/// How a worker's key tables compare with the coordinator's.
#[derive(PartialEq, Eq, Debug)]
pub enum Adoption {
    /// The keyring was empty: the coordinator's rows were taken.
    Taken,
    /// The keyring already was the coordinator's (registrations may have been added).
    Same,
    /// The keyring holds other rows: nothing was changed.
    Different,
}

/// Takes the coordinator's key tables into this worker's, as internal writes: into an empty
/// keyring, or checks that the keyring is the same; blind-index registrations the worker lacks
/// are added, and one registered here under the same id with another normalization is refused.
pub fn adopt_cluster_keyring(keyring: &str, index_key: &str, columns: &str) -> Adoption {
    let outcome = write("take the cluster's keyring", || {
        let empty = Spi::get_one::<bool>("SELECT NOT EXISTS (SELECT FROM cellcrypt.keyring) AND NOT EXISTS (SELECT FROM cellcrypt.index_key)")?.unwrap_or(false);
        let outcome = if empty {
            insert_key_tables_from_json(keyring, index_key)?;
            Adoption::Taken
        } else {
            // The same key identity: the current version (fingerprint, salt, KDF parameters) and
            // the current blind-index key. Older versions may differ in state, and counters in
            // value: each node re-encrypts and retires on its own.
            let same = Spi::get_one_with_args::<bool>(
                "SELECT EXISTS (SELECT FROM cellcrypt.keyring k \
                                JOIN pg_catalog.jsonb_populate_recordset(NULL::cellcrypt.keyring, $1::pg_catalog.jsonb) n \
                                  ON n.key_version OPERATOR(pg_catalog.=) k.key_version AND n.fingerprint OPERATOR(pg_catalog.=) k.fingerprint \
                                 AND n.kdf_salt OPERATOR(pg_catalog.=) k.kdf_salt AND n.kdf_memory_kib OPERATOR(pg_catalog.=) k.kdf_memory_kib \
                                 AND n.kdf_iterations OPERATOR(pg_catalog.=) k.kdf_iterations AND n.kdf_parallelism OPERATOR(pg_catalog.=) k.kdf_parallelism \
                                 AND n.state OPERATOR(pg_catalog.=) 'current' \
                                WHERE k.state OPERATOR(pg_catalog.=) 'current') \
                   AND NOT EXISTS (SELECT FROM pg_catalog.jsonb_populate_recordset(NULL::cellcrypt.index_key, $2::pg_catalog.jsonb) n \
                                   WHERE n.state OPERATOR(pg_catalog.=) 'current' AND NOT EXISTS ( \
                                       SELECT FROM cellcrypt.index_key k WHERE k.state OPERATOR(pg_catalog.=) 'current' \
                                          AND k.key_version OPERATOR(pg_catalog.=) n.key_version \
                                          AND k.wrapped_key OPERATOR(pg_catalog.=) n.wrapped_key \
                                          AND k.wrapped_under OPERATOR(pg_catalog.=) n.wrapped_under))",
                &[keyring.into(), index_key.into()],
            )?
            .unwrap_or(false);
            if same {
                Adoption::Same
            } else {
                return Ok(Adoption::Different);
            }
        };
        let conflict = Spi::get_one_with_args::<i32>(
            "SELECT (SELECT n.id FROM pg_catalog.jsonb_populate_recordset(NULL::cellcrypt.blind_index_column, $1::pg_catalog.jsonb) n \
             JOIN cellcrypt.blind_index_column c ON c.id OPERATOR(pg_catalog.=) n.id \
             WHERE c.normalization OPERATOR(pg_catalog.<>) n.normalization LIMIT 1)",
            &[columns.into()],
        )?;
        if let Some(id) = conflict {
            errors::raise(
                PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
                format!("blind-index column {id} is registered on this worker with another normalization than on the coordinator"),
                None,
                Some("Blind indexes of a Citus cluster are registered on the coordinator only."),
            )
        }
        Spi::run_with_args(
            "INSERT INTO cellcrypt.blind_index_column (id, normalization, table_name, column_name, created_at, created_by) \
             SELECT n.id, n.normalization, n.table_name, n.column_name, n.created_at, n.created_by \
             FROM pg_catalog.jsonb_populate_recordset(NULL::cellcrypt.blind_index_column, $1::pg_catalog.jsonb) n \
             WHERE NOT EXISTS (SELECT FROM cellcrypt.blind_index_column c WHERE c.id OPERATOR(pg_catalog.=) n.id)",
            &[columns.into()],
        )?;
        Ok(outcome)
    });
    outcome
}

/// A worker takes the coordinator's keyring after a cluster-wide key change (internal writes):
/// every row of `cellcrypt.keyring` and `cellcrypt.index_key` replaced by the coordinator's.
pub fn replace_with_cluster_keyring(keyring: &str, index_key: &str) {
    write("take the cluster's new keyring", || {
        // The rows replaced are kept (never used), as a restore from a dump keeps them.
        Spi::run(
            "WITH gone AS (DELETE FROM cellcrypt.keyring k RETURNING k.*) \
             INSERT INTO cellcrypt.replaced_key_row (table_name, key_row) SELECT 'keyring', pg_catalog.to_jsonb(gone) FROM gone",
        )?;
        Spi::run(
            "WITH gone AS (DELETE FROM cellcrypt.index_key k RETURNING k.*) \
             INSERT INTO cellcrypt.replaced_key_row (table_name, key_row) SELECT 'index_key', pg_catalog.to_jsonb(gone) FROM gone",
        )?;
        insert_key_tables_from_json(keyring, index_key)
    })
}

/// Drops the re-encryption jobs of tables Citus has since distributed (their rows are in the
/// shards, which each node re-encrypts as its own tables).
pub fn drop_citus_shell_jobs() -> Result<(), String> {
    if citus_shell_filter().is_empty() {
        return Ok(());
    }
    internally(|| {
        Spi::run(
            "DELETE FROM cellcrypt.reencryption_job j \
             WHERE EXISTS (SELECT FROM pg_catalog.pg_dist_partition p WHERE p.logicalrelid OPERATOR(pg_catalog.=) j.relid)",
        )
    })
    .map_err(job_error("could not drop the jobs of distributed tables"))
}

/// The coordinator's keyring row of `version` has this fingerprint and salt (a worker checks
/// that the key it holds is the one the coordinator replaces).
pub fn cluster_keyring_has(keyring: &str, version: u32, fingerprint: &str, salt: &[u8]) -> bool {
    as_extension_owner(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT FROM pg_catalog.jsonb_populate_recordset(NULL::cellcrypt.keyring, $1::pg_catalog.jsonb) k \
             WHERE k.key_version OPERATOR(pg_catalog.=) $2 AND k.fingerprint OPERATOR(pg_catalog.=) $3 AND k.kdf_salt OPERATOR(pg_catalog.=) $4)",
            &[keyring.into(), (version as i32).into(), fingerprint.into(), salt.to_vec().into()],
        )
    })
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// The primary workers that are inactive or that this coordinator cannot connect to now, as
/// `host:port` (Citus' `citus_check_connection_to_node`).
pub fn unreachable_workers() -> Vec<String> {
    as_extension_owner(|| {
        Spi::get_one::<Vec<String>>(
            "SELECT pg_catalog.array_agg(n.nodename OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) n.nodeport ORDER BY n.nodeid) \
             FROM pg_catalog.pg_dist_node n \
             WHERE n.groupid OPERATOR(pg_catalog.<>) 0 AND n.noderole OPERATOR(pg_catalog.=) 'primary' \
               AND (NOT n.isactive OR NOT pg_catalog.citus_check_connection_to_node(n.nodename, n.nodeport))",
        )
    })
    .unwrap_or_else(|e| errors::raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("could not check the cluster's workers: {e}"), None, None))
    .unwrap_or_default()
}

/// Citus' `run_command_on_workers(query)` as the calling role (it opens its own connections,
/// with that role's rights), with this function's search_path pinned: (node, result or error).
pub fn run_on_workers(query: &str) -> Vec<(String, Result<String, String>)> {
    let run = || {
        Spi::connect(|c| {
            let mut out = Vec::new();
            let t = c.select(
                "SELECT w.nodename OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) w.nodeport, w.success, w.result \
                 FROM pg_catalog.run_command_on_workers($1) w ORDER BY 1",
                None,
                &[query.into()],
            )?;
            for r in t {
                let node: String = r.get(1)?.unwrap_or_default();
                let ok: bool = r.get(2)?.unwrap_or(false);
                let result: String = r.get(3)?.unwrap_or_default();
                out.push((node, if ok { Ok(result) } else { Err(result) }));
            }
            Ok::<_, pgrx::spi::Error>(out)
        })
    };
    let mut saved_user = pg_sys::InvalidOid;
    let mut saved_context = 0;
    // SAFETY: reads this backend's identity; run_as restores it.
    unsafe { pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context) };
    run_as(saved_user, &[], run).unwrap_or_else(|e| vec![("workers".to_owned(), Err(e.to_string()))])
}

/// The coordinator's keyring after a change is this worker's keyring plus exactly one new
/// current version above every version here: every row here is there with the same
/// fingerprint, salt and KDF parameters (the current one now previous), and nothing else is.
pub fn cluster_keyring_extends_ours(keyring: &str) -> bool {
    as_extension_owner(|| {
        Spi::get_one_with_args::<bool>(
            "WITH n AS (SELECT * FROM pg_catalog.jsonb_populate_recordset(NULL::cellcrypt.keyring, $1::pg_catalog.jsonb)), \
                  k AS (SELECT * FROM cellcrypt.keyring) \
             SELECT NOT EXISTS (SELECT FROM k WHERE NOT EXISTS (SELECT FROM n WHERE n.key_version OPERATOR(pg_catalog.=) k.key_version \
                        AND n.fingerprint OPERATOR(pg_catalog.=) k.fingerprint AND n.kdf_salt OPERATOR(pg_catalog.=) k.kdf_salt \
                        AND n.kdf_memory_kib OPERATOR(pg_catalog.=) k.kdf_memory_kib AND n.kdf_iterations OPERATOR(pg_catalog.=) k.kdf_iterations \
                        AND n.kdf_parallelism OPERATOR(pg_catalog.=) k.kdf_parallelism \
                        AND n.state OPERATOR(pg_catalog.<>) 'current')) \
                AND (SELECT pg_catalog.count(*) FROM n WHERE NOT EXISTS (SELECT FROM k WHERE k.key_version OPERATOR(pg_catalog.=) n.key_version)) OPERATOR(pg_catalog.=) 1 \
                AND (SELECT pg_catalog.count(*) FROM n WHERE n.state OPERATOR(pg_catalog.=) 'current' \
                        AND n.key_version OPERATOR(pg_catalog.>) (SELECT pg_catalog.max(k.key_version) FROM k) \
                        AND NOT EXISTS (SELECT FROM k WHERE k.key_version OPERATOR(pg_catalog.=) n.key_version)) OPERATOR(pg_catalog.=) 1",
            &[keyring.into()],
        )
    })
    .ok()
    .flatten()
    .unwrap_or(false)
}

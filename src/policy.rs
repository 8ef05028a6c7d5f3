//! Who may call what, and one change at a time: the checks every guarded entry point makes,
//! and the extension's locks.
//!
//! * **Roles.** Superusers and members of `data_encryption_admin` manage keys; superusers and
//!   members of `data_encryption_reader` decrypt. Every guarded function is executable by
//!   PUBLIC and checks membership itself, so a refusal always carries our SQLSTATE (42501), a
//!   hint naming the role, and an audit record, whatever `lc_messages` is: nothing here reads
//!   the text of a message.
//! * **Transport.** Key calls travel only over SSL or the Unix socket (28000 otherwise).
//! * **Primary only.** Key calls and re-encryption are refused on a standby (25006).
//! * **Locks.** Key changes and blind-index key rotations are serialized by transaction-scoped
//!   locks on the extension's own catalog object (`LOCKTAG_OBJECT` on `pg_extension`, with a
//!   sub-id per kind), which no SQL statement can take: the advisory-lock space, which every
//!   role can use, is not involved. A session that dies or a server that crashes never leaves
//!   one behind.

use crate::audit::{self, Event};
use crate::errors;
use crate::keys;
use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode};

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

/// Records a refused call in the audit record (rate-bounded there).
pub fn refuse(action: &str, detail: &str) {
    audit::record(&Event { action, outcome: "refused", key_version: None, fingerprint: None, detail });
}

/// Key calls travel only over protected connections, like Dynamics' HTTPS rule.
pub fn require_secure_transport(action: &str, function: &str) {
    if !crate::gucs::REQUIRE_SECURE_TRANSPORT.get() || connection_is_secure() {
        return;
    }
    refuse(action, "TCP connection without SSL");
    errors::raise(
        PgSqlErrorCode::ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION,
        format!("{function} requires a secure connection"),
        Some("This connection is TCP without SSL, so a key would cross the network in the clear."),
        Some("Reconnect with SSL (sslmode=require or stronger) or over the server's Unix socket."),
    )
}

/// Raises 25006 on a standby: keys change on the primary, and a standby follows the primary's
/// keyring as it replays it (see `keys::try_loaded`).
pub fn require_primary(function: &str) {
    // SAFETY: a backend global.
    if !keys::on_standby() && unsafe { pg_sys::XactReadOnly } {
        errors::raise(
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            format!("{function} cannot run in a read-only transaction"),
            Some("It records the key in the database and in the key provider."),
            Some("Run it in a read-write transaction (SET TRANSACTION READ WRITE, or default_transaction_read_only = off)."),
        );
    }
    if keys::on_standby() {
        errors::raise(
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            format!("{function} cannot run on a standby"),
            Some("This server is in recovery: its keyring, like its data, is replicated from the primary."),
            Some("Run it on the primary. The standby follows a key change without a restart once its own key provider holds the new key (copy the key file, or update the key command's source)."),
        );
    }
}

/// Only superusers and members of `data_encryption_admin` manage keys: 42501 otherwise.
pub fn require_admin(function: &str) {
    if !crate::roles::current_user_has(crate::roles::ADMIN) {
        refuse(function, "not a member of data_encryption_admin");
        errors::raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied for {function}: only superusers and members of role data_encryption_admin manage the data encryption key"),
            None,
            Some("Ask an administrator to run GRANT data_encryption_admin TO <your role>."),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// One change at a time

/// The extension's locks.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    /// Key changes, and each batch of the re-encryption that follows one.
    KeyChange = 1,
    /// Blind-index key rotations.
    IndexKeyRotation = 2,
    /// Rows from a dump replacing key table rows: one restoring session at a time looks at
    /// what the rows in place are still needed for (pg_restore -j restores the two key tables
    /// from two sessions; the second must see what the first committed).
    RestoreFromDump = 3,
}

fn locktag(lock: Lock) -> pg_sys::LOCKTAG {
    // SET_LOCKTAG_OBJECT(tag, MyDatabaseId, ExtensionRelationId, <extension oid>, <lock>)
    pg_sys::LOCKTAG {
        // SAFETY: a backend global.
        locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
        locktag_field2: pg_sys::ExtensionRelationId.to_u32(),
        locktag_field3: crate::store::extension_oid().to_u32(),
        locktag_field4: lock as u16,
        locktag_type: pg_sys::LockTagType::LOCKTAG_OBJECT as u8,
        locktag_lockmethodid: pg_sys::DEFAULT_LOCKMETHOD as u8,
    }
}

/// Tries to take `lock` for the rest of this transaction, without waiting.
pub fn try_lock(lock: Lock) -> bool {
    let tag = locktag(lock);
    // SAFETY: a transaction-scoped lock, released by PostgreSQL at commit or abort.
    let r = unsafe { pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as pg_sys::LOCKMODE, false, true) };
    r != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
}

/// Takes `lock` for the rest of this transaction, waiting for its holder's transaction to end
/// (PostgreSQL's deadlock detector and lock_timeout apply).
pub fn lock_waiting(lock: Lock) {
    let tag = locktag(lock);
    // SAFETY: a transaction-scoped lock, released by PostgreSQL at commit or abort.
    unsafe { pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as pg_sys::LOCKMODE, false, false) };
}

/// The lock that makes key loads from the provider single-flight per database. An advisory
/// lock tag (object locks in exclusive mode cannot be taken on a standby, and standbys load
/// keys too), in a key space no SQL function reaches: `pg_advisory_lock()` and its kin always
/// use 1 or 2 in the tag's last field, this uses 0xCC01.
fn key_load_tag() -> pg_sys::LOCKTAG {
    pg_sys::LOCKTAG {
        // SAFETY: a backend global.
        locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
        locktag_field2: 0x7067_6363, // "pgcc"
        locktag_field3: 0x6b65_7973, // "keys"
        locktag_field4: 0xCC01,
        locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
        locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
    }
}

/// Runs `f`, a key load from the provider, while no other backend of this database runs one:
/// the others wait (interruptibly; `lock_timeout` applies) and then find its result. The lock
/// is released when `f` returns, or at the end of the transaction if `f` raises.
pub fn one_key_load_at_a_time<R>(f: impl FnOnce() -> R) -> R {
    let tag = key_load_tag();
    // SAFETY: a transaction-scoped lock; released below or by PostgreSQL at commit or abort.
    unsafe { pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as pg_sys::LOCKMODE, false, false) };
    let r = f();
    // SAFETY: the lock taken above.
    unsafe { pg_sys::LockRelease(&tag, pg_sys::ExclusiveLock as pg_sys::LOCKMODE, false) };
    r
}

/// As [`try_lock`], in share mode: holders of the share mode do not exclude each other, and
/// exclude (and are excluded by) the exclusive mode. A restore from a dump takes the locks so,
/// since pg_restore -j restores the two key tables from two sessions at once.
pub fn try_lock_shared(lock: Lock) -> bool {
    let tag = locktag(lock);
    // SAFETY: a transaction-scoped lock, released by PostgreSQL at commit or abort.
    let r = unsafe { pg_sys::LockAcquire(&tag, pg_sys::ShareLock as pg_sys::LOCKMODE, false, true) };
    r != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
}

/// Who holds `lock`, for the message that refuses a second change.
fn holder(lock: Lock) -> Option<String> {
    crate::store::as_extension_owner(|| {
        Spi::get_one_with_args::<String>(
            "SELECT pg_catalog.format('process %s, role %s, from %s, started at %s', a.pid, COALESCE(a.usename::pg_catalog.text, '?'), \
                    COALESCE(pg_catalog.host(a.client_addr), 'a local socket'), COALESCE(a.xact_start::pg_catalog.text, '?')) \
             FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid OPERATOR(pg_catalog.=) l.pid \
             WHERE l.locktype OPERATOR(pg_catalog.=) 'object' AND l.database OPERATOR(pg_catalog.=) $1 \
               AND l.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_extension'::pg_catalog.regclass \
               AND l.objid OPERATOR(pg_catalog.=) $2 AND l.objsubid OPERATOR(pg_catalog.=) $3 AND l.granted LIMIT 1",
            &[
                // SAFETY: a backend global.
                unsafe { pg_sys::MyDatabaseId }.into(),
                crate::store::extension_oid().into(),
                (lock as i16).into(),
            ],
        )
        .ok()
        .flatten()
    })
}

/// Takes `lock` for this transaction, or raises 55P03 naming the holder.
pub fn lock_or_refuse(lock: Lock, action: &str) {
    if try_lock(lock) {
        return;
    }
    let holder = holder(lock).unwrap_or_else(|| "a session that has just ended".to_owned());
    let (what, hint) = match lock {
        Lock::KeyChange => (
            "another data encryption key change is in progress in this database",
            "Wait until it finishes (a change includes re-encrypting every value: see data_encryption_progress, or finish it now with CALL finish_data_encryption_reencryption();), then try again.",
        ),
        Lock::IndexKeyRotation => ("another blind-index key rotation is in progress in this database", "Wait for it to finish, then try again if still needed."),
        Lock::RestoreFromDump => ("a restore from a dump is replacing this database's keyring", "Wait for the restore to finish, then try again."),
    };
    refuse(action, &format!("{what}: {holder}"));
    errors::raise(PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE, what, Some(&format!("It was started by {holder}.")), Some(hint))
}

/// A change's re-encryption must finish before the next change: 55P03, saying who started it,
/// when, and how far it is.
pub fn refuse_while_reencrypting(action: &str) {
    let Some(running) = crate::store::running_change() else { return };
    refuse(action, &format!("re-encryption still running: {running}"));
    errors::raise(
        PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
        "the previous data encryption key change is still re-encrypting this database",
        Some(&format!("Re-encryption of {running}.")),
        Some("Wait for it to finish (see the views data_encryption_status and data_encryption_progress), or finish it now with CALL finish_data_encryption_reencryption();."),
    )
}

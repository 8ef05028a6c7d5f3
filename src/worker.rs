//! The background work of key changes: a launcher at server start and one re-encryption worker
//! per database that has work.
//!
//! * The **launcher** (a static background worker, started once recovery has finished) lists
//!   the databases that accept connections (templates excepted) and starts a re-encryption
//!   worker for each; a worker in a database without the extension or without pending work
//!   exits at once. It then stays, idle, so that PostgreSQL starts it again after a crash
//!   (it forgets a static worker that has exited). So after a restart or a crash, unfinished
//!   re-encryption resumes with no administrator action, including the work of a change that
//!   committed just before the crash, before it could start its worker.
//! * The worker loads the key only when it has work, or with the `file` provider (cheap), and
//!   then records where this cluster keeps the database's key file, when
//!   `cellcrypt.key_location` names another cluster's (after `pg_upgrade`, see `providers.rs`):
//!   the next upgrade then finds the key file under this cluster's name.
//! * A key change starts its database's **worker** when it commits.
//! * A worker runs [`crate::reencrypt::step`] in its own short transactions, each holding the
//!   key-change lock (`policy.rs`); `set_data_encryption_key` is refused with 55P03 while jobs are
//!   left, so the lock and the jobs together cover the whole change. It pauses
//!   `pg_cellcrypt.reencrypt_pause` between batches. Should it fail or be killed, PostgreSQL
//!   restarts it after a few seconds (and the launcher starts it after a server restart).

use crate::policy::{try_lock, Lock};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::pg_sys;
use std::time::Duration;

/// How long the worker waits before trying a batch again that holds a value it cannot decrypt.
pub const BLOCKED_RETRY: Duration = Duration::from_secs(5);

pub const WORKER_TYPE: &str = "pg_cellcrypt re-encryption";

/// Registers the launcher; from `_PG_init`.
pub fn init() {
    BackgroundWorkerBuilder::new("pg_cellcrypt launcher")
        .set_type("pg_cellcrypt launcher")
        .set_library("pg_cellcrypt")
        .set_function("cellcrypt_launcher_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        // Restarted after a crash too: a key change that committed just before a crash may not
        // have started its worker, and PostgreSQL forgets workers that are never restarted.
        .set_restart_time(Some(Duration::from_secs(10)))
        .load();
}

/// Starts the re-encryption worker of database `dboid`. False when no worker slot is free.
pub fn start_worker(dboid: pg_sys::Oid) -> bool {
    BackgroundWorkerBuilder::new(&format!("{WORKER_TYPE} for database {}", dboid.to_u32()))
        .set_type(WORKER_TYPE)
        .set_library("pg_cellcrypt")
        .set_function("cellcrypt_reencrypt_worker_main")
        .enable_spi_access()
        .set_argument(Some(pg_sys::Datum::from(dboid.to_u32())))
        .set_restart_time(Some(Duration::from_secs(5)))
        .load_dynamic()
        .is_ok()
}

/// Pins this worker's `search_path` to `pg_catalog, pg_temp` for its whole life, over whatever
/// `ALTER DATABASE ... SET search_path` or `ALTER ROLE ... SET` says: the worker runs as the
/// bootstrap superuser, and the database's owner controls those settings.
fn pin_search_path() {
    // Also the settings a database owner could use to stop the work: a read-only default, and
    // timeouts. SAFETY: session-level settings with the highest source, as autovacuum pins its own.
    let settings: [(&std::ffi::CStr, &std::ffi::CStr); 5] = [
        (c"search_path", crate::store::SAFE_SEARCH_PATH),
        (c"default_transaction_read_only", c"off"),
        (c"statement_timeout", c"0"),
        (c"lock_timeout", c"0"),
        (c"idle_in_transaction_session_timeout", c"0"),
    ];
    for (name, value) in settings {
        unsafe { pg_sys::SetConfigOption(name.as_ptr(), value.as_ptr(), pg_sys::GucContext::PGC_SUSET, pg_sys::GucSource::PGC_S_OVERRIDE) };
    }
}

/// Ends this worker with exit code 1, so that PostgreSQL starts it again (after its restart
/// time) when it was terminated while the server runs; exit code 0 would unregister it.
/// (PostgreSQL 18's headers mark `proc_exit` noreturn in a way bindgen does not carry over.)
#[allow(unreachable_code)]
fn exit_to_be_restarted() -> ! {
    // SAFETY: ends this background worker.
    unsafe { pg_sys::proc_exit(1) };
    unreachable!("proc_exit returned")
}

/// The databases that accept connections, read from the shared catalog like autovacuum does.
fn databases() -> Vec<pg_sys::Oid> {
    let mut out = Vec::new();
    // SAFETY: a catalog heap scan inside a transaction, as autovacuum's get_database_list.
    unsafe {
        let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        loop {
            let tup = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tup.is_null() {
                break;
            }
            let db = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tup);
            // Template databases are skipped: a worker connected to template1 would make a
            // concurrent CREATE DATABASE fail ("source database is being accessed").
            if (*db).datallowconn && !(*db).datistemplate {
                out.push((*db).oid);
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    }
    out
}

#[unsafe(no_mangle)]
#[pg_guard]
pub extern "C-unwind" fn cellcrypt_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // pg_upgrade runs both clusters in binary-upgrade mode: nothing may be written then.
    // SAFETY: a backend global, set at postmaster start.
    if unsafe { pg_sys::IsBinaryUpgrade } {
        return;
    }
    BackgroundWorker::connect_worker_to_spi(None, None);
    pin_search_path();
    let dbs = BackgroundWorker::transaction(databases);
    for db in dbs {
        while !start_worker(db) {
            // All worker slots are taken: wait for one to free up.
            if !BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
                exit_to_be_restarted();
            }
        }
    }
    // Then stay, idle, until shutdown: a launcher that exited would be unregistered, and
    // after a crash (when the postmaster restarts every registered worker) nothing would
    // resume the work of a change that committed just before it.
    while BackgroundWorker::wait_latch(Some(Duration::from_secs(3600))) {}
    // Restarted (10 s later) if it was terminated while the server runs (pg_terminate_backend);
    // at shutdown nothing is restarted anyway.
    exit_to_be_restarted();
}

#[unsafe(no_mangle)]
#[pg_guard]
pub extern "C-unwind" fn cellcrypt_reencrypt_worker_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let dboid = pg_sys::Oid::from(arg.value() as u32);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(dboid), None);
    pin_search_path();
    let has_work = BackgroundWorker::transaction(|| {
        // Without the key (a restored database not restored yet, the none provider after a
        // restart) there is nothing this worker can do; the key restore starts it again.
        if crate::store::extension_oid() == pg_sys::InvalidOid {
            return false;
        }
        // With the file provider, the key is loaded at every start, cheaply: after pg_upgrade
        // that is what copies the old cluster's key file (providers.rs). Another provider (a
        // KMS that may hang) is asked only by a database that has re-encryption to do.
        if crate::providers::current() == crate::gucs::KeyProvider::File && crate::keys::try_loaded().is_ok() {
            crate::key_admin::note_key_location();
        }
        crate::store::has_reencryption_work() && crate::keys::try_loaded().is_ok()
    });
    if !has_work {
        return;
    }
    pgrx::log!("pg_cellcrypt: re-encryption started in database {}", dboid.to_u32());
    loop {
        if BackgroundWorker::sighup_received() {
            // SAFETY: reloading the configuration file in a background worker's main loop.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        // Each batch holds the key-change lock for its transaction; between batches, a key
        // change is refused because the jobs are still there.
        let status = BackgroundWorker::transaction(|| {
            if try_lock(Lock::KeyChange) { crate::reencrypt::step() } else { "busy".to_owned() }
        });
        let pause = match status.as_str() {
            "done" | "idle" => break,
            "waiting" | "busy" => Duration::from_millis(100),
            // A value that does not decrypt stops the work (data_encryption_status says where);
            // retry now and then, as the row may have been fixed.
            "blocked" => BLOCKED_RETRY,
            _ => Duration::from_millis(crate::gucs::REENCRYPT_PAUSE_MS.get().max(0) as u64),
        };
        // Terminated with work left: exit so as to be started again.
        if !pause.is_zero() && !BackgroundWorker::wait_latch(Some(pause)) {
            exit_to_be_restarted();
        }
        if BackgroundWorker::sigterm_received() {
            exit_to_be_restarted();
        }
    }
    pgrx::log!("pg_cellcrypt: re-encryption finished in database {}", dboid.to_u32());
}

//! Re-encryption: moving every encrypted value of the database under the current key, online.
//!
//! ## The work
//! A key change records one job per table that has encrypted columns
//! (`cellcrypt.reencryption_job`), in the change's own transaction. The jobs are then worked
//! off in small committed batches, by the background worker (`worker.rs`, started when the
//! change commits and again after every server start) or in the foreground by
//! `CALL finish_data_encryption_reencryption()`. Both call [`step`], which does one unit of
//! work per transaction:
//!
//! * **batch**: claim one pending job (`FOR UPDATE SKIP LOCKED`, so two runners never do the
//!   same batch), and rewrite the rows of the next range of blocks whose values are under an
//!   older key: `UPDATE t SET c = cellcrypt.reencrypt(c) WHERE ctid >= '(a,0)' AND ctid <
//!   '(b,0)' AND encryption_key_version(c) <> v`; `reencrypt()` counts the values it moves. A
//!   TID range scan reads only those blocks; the job's next block is committed with the batch,
//!   so a crash loses at most one batch, which is simply done again. A value that does not
//!   decrypt (tampered, or under a key version this database lacks) cannot be re-encrypted:
//!   the batch is rolled back, the job records where (`data_encryption_status`,
//!   `data_encryption_progress.blocked_by`) and the batch is tried again until the row is
//!   fixed. Row locks are those of a plain UPDATE, and a row an application updates meanwhile
//!   is re-checked by PostgreSQL (its new version has moved, so the batch skips it and keeps
//!   the application's value). Before each batch, the blocks of the batch two back are pruned
//!   and their free space recorded ([`reclaim`]), so the new row versions fill the space the
//!   old ones left and the table does not grow to twice its size;
//! * **verify**: a pass covers the blocks the table had when it began (rewritten rows land
//!   beyond them or in blocks the pass has already done, under the new key); at its end the
//!   table is marked done;
//! * **finish**: once every table is done and every transaction that began before the work
//!   started has ended, count in every table the values still under an older key (written or
//!   copied by sessions meanwhile); a table with any gets another pass. When none is left,
//!   **retire** the older key versions:
//!   their wrapped keys are deleted from the keyring, so nothing in the database can decrypt
//!   with them any more, and the audit record notes the completion.
//!
//! What it covers: every column of an encrypted type in ordinary tables and partitions
//! (partitioned tables through their partitions), in every schema, except temporary tables.
//! Encrypted values inside arrays, composite types or materialized views are not rewritten.
//!
//! The updates run as the extension's owner, with `session_replication_role = replica`, so
//! user triggers do not fire: re-encryption changes no value, only its envelope.

use crate::audit::{self, Event};
use crate::backend_local::BackendLocal;
use crate::errors;
use crate::keys;
use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode};
use std::cell::RefCell;

fn spi_err(what: &str) -> impl Fn(pgrx::spi::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn fail(msg: String) -> ! {
    errors::raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, msg, None, None)
}

/// The extension's schema, quoted. Read once per backend and extension: the extension is not
/// relocatable, so only a DROP and CREATE EXTENSION moves it, and that gives it a new OID.
fn ext_schema() -> String {
    static CACHE: BackendLocal<RefCell<Option<(pg_sys::Oid, String)>>> = BackendLocal::new(RefCell::new(None));
    // SAFETY: a catalog lookup by name; missing_ok, so no error is raised.
    let ext = unsafe { pg_sys::get_extension_oid(c"pg_cellcrypt".as_ptr(), true) };
    CACHE.with(|c| {
        if let Some((oid, schema)) = c.borrow().as_ref() {
            if *oid == ext {
                return schema.clone();
            }
        }
        let schema: String = Spi::get_one(
            "SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'pg_cellcrypt'",
        )
        .ok()
        .flatten()
        .unwrap_or_else(|| "public".into());
        *c.borrow_mut() = Some((ext, schema.clone()));
        schema
    })
}

/// Records one job per table with encrypted columns; called by a key change. Returns how many.
pub fn create_jobs(version: u32) -> i64 {
    keys::as_extension_owner(|| {
        Spi::connect_mut(|c| {
            c.update(
                "INSERT INTO cellcrypt.reencryption_job (relid, key_version, columns) \
                 SELECT c.oid, $1, array_agg(pg_catalog.quote_ident(a.attname) ORDER BY a.attnum) \
                 FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
                 WHERE a.atttypid IN (SELECT d.objid FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid \
                                      WHERE e.extname = 'pg_cellcrypt' AND d.classid = 'pg_catalog.pg_type'::pg_catalog.regclass AND d.deptype = 'e') \
                   AND c.relkind = 'r' AND c.relpersistence <> 't' AND a.attnum > 0 AND NOT a.attisdropped \
                 GROUP BY c.oid",
                None,
                &[(version as i32).into()],
            )
            .map(|t| t.len() as i64)
        })
        .unwrap_or_else(|e| fail(format!("could not plan the re-encryption: {e}")))
    })
}

struct Job {
    relid: pg_sys::Oid,
    version: i32,
    columns: Vec<String>,
    next_block: i64,
    total_blocks: i64,
}

fn filter(schema: &str, columns: &[String], version: i32) -> String {
    columns.iter().map(|c| format!("{schema}.encryption_key_version({c}) <> {version}")).collect::<Vec<_>>().join(" OR ")
}

/// One unit of re-encryption work, in the caller's transaction. Returns what it did:
/// `batch`, `verify`, `busy` (another runner holds the only pending job), `waiting` (for
/// transactions older than the work), `blocked` (a value of the batch does not decrypt: the
/// job's `last_error` says where, and the batch is tried again later), `done` (this call
/// retired the old keys) or `idle`. Refused on a standby.
pub fn step() -> String {
    crate::key_admin::require_primary("re-encryption");
    keys::as_extension_owner(|| with_replica_role(|| step_inner().unwrap_or_else(|e| fail(e))))
}

/// Runs `f` with `session_replication_role = replica`, so that user triggers do not fire. The
/// setting is saved in a GUC nesting level of its own and restored when `f` returns, or by
/// PostgreSQL when an error aborts the (sub)transaction, the way index builds scope theirs.
fn with_replica_role<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: the pattern of PostgreSQL's own callers (index builds, RI checks): a new nesting
    // level, a saved setting, and the level popped (restoring the setting) afterwards.
    unsafe {
        let nest = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"session_replication_role".as_ptr(),
            c"replica".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        let r = f();
        pg_sys::AtEOXact_GUC(true, nest);
        r
    }
}

fn step_inner() -> Result<String, String> {
    Spi::run("UPDATE cellcrypt.reencryption_job SET started_at = pg_catalog.clock_timestamp() WHERE started_at IS NULL")
        .map_err(spi_err("could not start the re-encryption"))?;
    let job = Spi::connect_mut(|c| {
        let t = c.update(
            "SELECT relid, key_version, columns, next_block, total_blocks FROM cellcrypt.reencryption_job \
             WHERE state = 'pending' ORDER BY relid LIMIT 1 FOR UPDATE SKIP LOCKED",
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
    .map_err(spi_err("could not read the re-encryption jobs"))?;
    if let Some(job) = job {
        return process(job);
    }
    let (pending, total): (i64, i64) = Spi::get_two("SELECT count(*) FILTER (WHERE state = 'pending'), count(*) FROM cellcrypt.reencryption_job")
        .map(|(a, b)| (a.unwrap_or(0), b.unwrap_or(0)))
        .map_err(spi_err("could not read the re-encryption jobs"))?;
    if total == 0 {
        // Older key versions without jobs (a database restored from a dump taken during a
        // change): plan the work now; they are retired only after it is verified.
        let previous: bool = Spi::get_one("SELECT EXISTS (SELECT FROM cellcrypt.keyring WHERE state = 'previous')")
            .map_err(spi_err("could not read the keyring"))?
            .unwrap_or(false);
        if !previous {
            return Ok("idle".into());
        }
        let current = keys::loaded().current_version;
        create_jobs(current);
        Spi::run("INSERT INTO cellcrypt.reencryption_job (relid, key_version, columns, state) SELECT 0, 0, '{}', 'verified' WHERE NOT EXISTS (SELECT FROM cellcrypt.reencryption_job)")
            .map_err(spi_err("could not plan the re-encryption"))?;
        return Ok("verify".into());
    }
    if pending > 0 {
        return Ok("busy".into());
    }
    finish()
}

fn process(job: Job) -> Result<String, String> {
    // The table's name and size in one query; no row: the table was dropped meanwhile.
    type Sized = Option<(String, i64, f64)>;
    let sized: Sized = Spi::connect(|c| {
        let t = c.select(
            "SELECT oid::pg_catalog.regclass::text, (pg_catalog.pg_relation_size(oid) / pg_catalog.current_setting('block_size')::int)::bigint, \
                    CASE WHEN relpages > 0 AND reltuples > 0 THEN reltuples / relpages ELSE 50 END::float8 \
             FROM pg_catalog.pg_class WHERE oid = $1",
            None,
            &[job.relid.into()],
        )?;
        let mut out = None;
        for r in t {
            out = Some((r.get::<String>(1)?.unwrap_or_default(), r.get::<i64>(2)?.unwrap_or(0), r.get::<f64>(3)?.unwrap_or(50.0)));
        }
        Ok::<Sized, pgrx::spi::Error>(out)
    })
    .map_err(spi_err("could not look up a table"))?;
    let Some((table, size_now, rows_per_block)) = sized else {
        Spi::run_with_args("DELETE FROM cellcrypt.reencryption_job WHERE relid = $1", &[job.relid.into()]).map_err(spi_err("could not drop a job"))?;
        return Ok("batch".into());
    };
    // A pass covers the blocks the table had when the pass began: rows rewritten by the pass
    // land beyond them (or in freed space) and are already under the new key. Anything written
    // under an old key meanwhile is found by the verification in `finish`.
    let nblocks = if job.total_blocks > 0 { job.total_blocks } else { size_now };
    if job.next_block >= nblocks {
        Spi::run_with_args(
            "UPDATE cellcrypt.reencryption_job SET state = 'verified', updated_at = pg_catalog.clock_timestamp() WHERE relid = $1",
            &[job.relid.into()],
        )
        .map_err(spi_err("could not record progress"))?;
        return Ok("verify".into());
    }
    let batch_rows = crate::gucs::REENCRYPT_BATCH_SIZE.get().max(1) as f64;
    let blocks = ((batch_rows / rows_per_block.max(1.0)).floor() as i64).max(1);
    // The rows the batch before last moved out of its blocks are dead by now: free their space,
    // so that this batch's new row versions go there instead of growing the table.
    if job.next_block > blocks {
        reclaim(job.relid, (job.next_block - 2 * blocks).max(0), job.next_block - blocks);
    }
    let end = (job.next_block + blocks).min(nblocks);
    let set = job.columns.iter().map(|c| format!("{c} = cellcrypt.reencrypt({c})")).collect::<Vec<_>>().join(", ");
    // Only rows with a value under an older key: without this test, rows whose new versions
    // this pass wrote into free space further on in the table would be rewritten again.
    let condition = filter(&ext_schema(), &job.columns, job.version);
    let update = format!("UPDATE {table} SET {set} WHERE ctid >= '({},0)'::tid AND ctid < '({end},0)'::tid AND ({condition})", job.next_block);
    // Values, not rows, are counted: those reencrypt() moved to the current key.
    let batch = || -> Result<i64, String> {
        let before = crate::types::resealed_count();
        Spi::run(update.as_str()).map_err(spi_err(&format!("could not re-encrypt table {table}")))?;
        Ok((crate::types::resealed_count() - before) as i64)
    };
    let n = match catching_data_errors(batch) {
        Ok(n) => n?,
        Err(message) => {
            // A value that cannot be decrypted cannot be re-encrypted either. The work stops at
            // this batch, says where, and is retried until the row is restored or deleted.
            let blocked = format!(
                "{message} (a row in blocks {}..{end} of {table}: SELECT ctid FROM {table} WHERE ctid >= '({},0)' AND ctid < '({end},0)')",
                job.next_block, job.next_block
            );
            Spi::run_with_args(
                "UPDATE cellcrypt.reencryption_job SET last_error = $2, updated_at = pg_catalog.clock_timestamp() WHERE relid = $1",
                &[job.relid.into(), blocked.into()],
            )
            .map_err(spi_err("could not record progress"))?;
            return Ok("blocked".into());
        }
    };
    Spi::run_with_args(
        "UPDATE cellcrypt.reencryption_job SET next_block = $2, total_blocks = $3, cells_done = cells_done + $4, last_error = NULL, updated_at = pg_catalog.clock_timestamp() WHERE relid = $1",
        &[job.relid.into(), end.into(), nblocks.into(), n.into()],
    )
    .map_err(spi_err("could not record progress"))?;
    Ok("batch".into())
}

/// Frees the space of the dead row versions in blocks `start..end` of a table, those a batch
/// two steps back rewrote, and tells the free space map, so that later batches (and the
/// application) write their new row versions there. Without it, re-encryption would grow every
/// table to twice its size, as `UPDATE t SET c = c` does, extending it one new block at a time.
///
/// Each block is pruned as any reader of it would prune it (`heap_page_prune_opt`: only if no
/// running transaction can still see the old versions, and only if it gets the block's cleanup
/// lock at once; otherwise the block stays as it is, and the table grows as before). The batch
/// two back rather than the one just before: a transaction that began while the previous batch
/// ran may still see its old versions, but rarely one from the batch before that. The free
/// space map is what VACUUM keeps: a hint, not logged, and checked again by whoever uses it.
/// Blocks behind a pass hold only rows under the current key, and anything written there under
/// an older key is found by the verification, as anywhere else.
fn reclaim(relid: pg_sys::Oid, start: i64, end: i64) {
    // SAFETY: the calls VACUUM and heap scans make, in their order: the table opened with the
    // lock an UPDATE takes (kept to the end of the transaction), each block pinned while it is
    // pruned (which takes its own cleanup lock) and share-locked while its free space is read;
    // only heap tables, whose blocks these functions understand.
    unsafe {
        let rel = pg_sys::try_relation_open(relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        if rel.is_null() {
            return;
        }
        if (*rel).rd_tableam == pg_sys::GetHeapamTableAmRoutine() {
            let nblocks = pg_sys::RelationGetNumberOfBlocksInFork(rel, pg_sys::ForkNumber::MAIN_FORKNUM) as i64;
            let end = end.min(nblocks);
            for block in start..end {
                pg_sys::check_for_interrupts!();
                let block = block as pg_sys::BlockNumber;
                let buf = pg_sys::ReadBufferExtended(rel, pg_sys::ForkNumber::MAIN_FORKNUM, block, pg_sys::ReadBufferMode::RBM_NORMAL, std::ptr::null_mut());
                pg_sys::heap_page_prune_opt(rel, buf);
                pg_sys::LockBuffer(buf, pg_sys::BUFFER_LOCK_SHARE as i32);
                let free = pg_sys::PageGetHeapFreeSpace(pg_sys::BufferGetPage(buf));
                pg_sys::LockBuffer(buf, pg_sys::BUFFER_LOCK_UNLOCK as i32);
                pg_sys::ReleaseBuffer(buf);
                pg_sys::RecordPageWithFreeSpace(rel, block, free);
            }
            if start < end {
                pg_sys::FreeSpaceMapVacuumRange(rel, start as pg_sys::BlockNumber, end as pg_sys::BlockNumber);
            }
        }
        pg_sys::relation_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
}

/// Runs `f` in a subtransaction. A data error (a value that does not decrypt, or names a key
/// version this database does not have) rolls the subtransaction back and comes back as its
/// message; any other error propagates as usual.
fn catching_data_errors<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    // SAFETY: the pattern of PostgreSQL's procedural languages for a subtransaction that may
    // fail: begin it, run the body, then release it or roll it back, restoring the caller's
    // memory context and resource owner either way.
    unsafe {
        let ctx = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(ctx);
        let f = std::cell::Cell::new(Some(f));
        let rollback = |e: pgrx::pg_sys::panic::CaughtError| {
            let message = match &e {
                pgrx::pg_sys::panic::CaughtError::PostgresError(r) | pgrx::pg_sys::panic::CaughtError::ErrorReport(r) => r.message().to_owned(),
                pgrx::pg_sys::panic::CaughtError::RustPanic { ereport, .. } => ereport.message().to_owned(),
            };
            pg_sys::MemoryContextSwitchTo(ctx);
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            pg_sys::MemoryContextSwitchTo(ctx);
            pg_sys::CurrentResourceOwner = owner;
            Err(message)
        };
        let r = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| Ok(f.take().expect("runs once")())))
            .catch_when(PgSqlErrorCode::ERRCODE_DATA_CORRUPTED, rollback)
            .catch_when(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, rollback)
            .execute();
        if r.is_ok() {
            pg_sys::ReleaseCurrentSubTransaction();
            pg_sys::MemoryContextSwitchTo(ctx);
            pg_sys::CurrentResourceOwner = owner;
        }
        r
    }
}

fn finish() -> Result<String, String> {
    // Only one runner finishes: it must hold every job row.
    let (locked, total): (i64, i64) = Spi::connect_mut(|c| {
        let t = c.update("SELECT count(*) FROM (SELECT FROM cellcrypt.reencryption_job FOR UPDATE SKIP LOCKED) s", None, &[])?;
        let locked = t.first().get_one::<i64>()?.unwrap_or(0);
        let total = c.select("SELECT count(*) FROM cellcrypt.reencryption_job", None, &[])?.first().get_one::<i64>()?.unwrap_or(0);
        Ok::<_, pgrx::spi::Error>((locked, total))
    })
    .map_err(spi_err("could not lock the re-encryption jobs"))?;
    if locked < total {
        return Ok("busy".into());
    }
    // Sessions whose transaction began before the work started may still seal with the old
    // key; wait for them before the last verification.
    let waiting: i64 = Spi::get_one(
        "SELECT count(*) FROM pg_catalog.pg_stat_activity \
         WHERE datid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database()) \
           AND pid <> pg_catalog.pg_backend_pid() AND xact_start IS NOT NULL AND backend_type <> 'autovacuum worker' \
           AND xact_start < (SELECT min(started_at) FROM cellcrypt.reencryption_job)",
    )
    .map_err(spi_err("could not check running transactions"))?
    .unwrap_or(0);
    if waiting > 0 {
        return Ok("waiting".into());
    }
    let schema = ext_schema();
    let jobs: Vec<(pg_sys::Oid, i32, Vec<String>)> = Spi::connect(|c| {
        let t = c.select("SELECT relid, key_version, columns FROM cellcrypt.reencryption_job WHERE relid IN (SELECT oid FROM pg_catalog.pg_class)", None, &[])?;
        let mut out = Vec::new();
        for r in t {
            out.push((r.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::InvalidOid), r.get::<i32>(2)?.unwrap_or(0), r.get::<Vec<String>>(3)?.unwrap_or_default()));
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .map_err(spi_err("could not read the re-encryption jobs"))?;
    let mut again = false;
    for (relid, version, columns) in &jobs {
        let table: String = Spi::get_one_with_args("SELECT $1::pg_catalog.regclass::text", &[(*relid).into()]).map_err(spi_err("could not name a table"))?.unwrap_or_default();
        let left: i64 = Spi::get_one(&format!("SELECT count(*) FROM {table} WHERE {}", filter(&schema, columns, *version)))
            .map_err(spi_err("could not verify a table"))?
            .unwrap_or(0);
        if left > 0 {
            again = true;
            Spi::run_with_args("UPDATE cellcrypt.reencryption_job SET state = 'pending', next_block = 0, total_blocks = 0, pass = pass + 1 WHERE relid = $1", &[(*relid).into()])
                .map_err(spi_err("could not record progress"))?;
        }
    }
    if again {
        return Ok("verify".into());
    }
    // Every value is under the current key: retire the older versions.
    let (retired, cells): (Option<String>, Option<i64>) = Spi::get_two(
        "SELECT (SELECT string_agg(key_version::text, ', ' ORDER BY key_version) FROM cellcrypt.keyring WHERE state = 'previous'), \
                (SELECT sum(cells_done)::bigint FROM cellcrypt.reencryption_job)",
    )
    .map_err(spi_err("could not read the keyring"))?;
    let current: (Option<i32>, Option<String>) = Spi::get_two("SELECT key_version, fingerprint FROM cellcrypt.keyring WHERE state = 'current'").map_err(spi_err("could not read the keyring"))?;
    Spi::run("UPDATE cellcrypt.keyring SET reencrypted_values = coalesce(reencrypted_values, 0) + coalesce((SELECT sum(cells_done) FROM cellcrypt.reencryption_job), 0) WHERE state = 'current'")
        .map_err(spi_err("could not update the keyring"))?;
    Spi::run("UPDATE cellcrypt.keyring SET state = 'retired', wrapped_data_key = NULL WHERE state = 'previous'").map_err(spi_err("could not retire old keys"))?;
    Spi::run("DELETE FROM cellcrypt.reencryption_job").map_err(spi_err("could not clear the jobs"))?;
    let detail = format!("{} values re-encrypted; retired key versions: {}", cells.unwrap_or(0), retired.as_deref().unwrap_or("none"));
    audit::record(&Event {
        action: "reencryption",
        outcome: "completed",
        key_version: current.0.map(|v| v as u32),
        fingerprint: current.1.as_deref(),
        detail: &detail,
    });
    crate::key_admin::announce_at_commit();
    Ok("done".into())
}

/// `cellcrypt._reencrypt_step() returns text`: one unit of work (see [`step`]).
#[unsafe(no_mangle)]
#[doc(hidden)]
pub extern "C" fn pg_finfo_cellcrypt_reencrypt_step() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

#[unsafe(no_mangle)]
#[pg_guard]
pub unsafe extern "C-unwind" fn cellcrypt_reencrypt_step(_fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    crate::key_admin::require_admin("finish_data_encryption_reencryption()");
    let s = step();
    pgrx::IntoDatum::into_datum(s).unwrap_or(pg_sys::Datum::from(0))
}

// The jobs, the progress view and the foreground procedure.
pgrx::extension_sql!(
    r#"
-- Re-encryption after a key change: one job per table with encrypted columns (reencrypt.rs).
CREATE TABLE cellcrypt.reencryption_job (
    relid        oid PRIMARY KEY,
    key_version  integer NOT NULL,
    columns      text[] NOT NULL,
    state        text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'verified')),
    next_block   bigint NOT NULL DEFAULT 0,
    total_blocks bigint NOT NULL DEFAULT 0,
    pass         integer NOT NULL DEFAULT 1,
    cells_done   bigint NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    created_by   name NOT NULL DEFAULT session_user,
    started_at   timestamptz,
    updated_at   timestamptz,
    last_error   text
);
COMMENT ON TABLE cellcrypt.reencryption_job IS 'Re-encryption work left after a key change; see the view data_encryption_progress';
CREATE FUNCTION cellcrypt._reencrypt_step() RETURNS text
    AS 'MODULE_PATHNAME', 'cellcrypt_reencrypt_step' LANGUAGE c VOLATILE;
REVOKE ALL ON FUNCTION cellcrypt._reencrypt_step() FROM PUBLIC;

CREATE VIEW @extschema@.data_encryption_progress AS
SELECT j.relid::pg_catalog.regclass AS table_name,
       j.key_version,
       j.state,
       j.pass,
       j.cells_done,
       CASE WHEN j.state = 'verified' THEN 0
            ELSE pg_catalog.round(greatest(c.reltuples, 0) * pg_catalog.array_length(j.columns, 1)
                      * (1 - least(1, j.next_block::float8 / greatest(j.total_blocks, 1))))::bigint END AS cells_remaining,
       CASE WHEN j.updated_at > j.started_at
            THEN pg_catalog.round(j.cells_done / pg_catalog.array_length(j.columns, 1)
                      / extract(epoch FROM j.updated_at - j.started_at))::bigint END AS rows_per_second,
       CASE WHEN j.state = 'verified' THEN j.updated_at
            WHEN j.updated_at > j.started_at AND j.cells_done > 0
            THEN pg_catalog.now() + (greatest(c.reltuples, 0) * pg_catalog.array_length(j.columns, 1)
                      * (1 - least(1, j.next_block::float8 / greatest(j.total_blocks, 1))))
                 * ((j.updated_at - j.started_at) / j.cells_done) END AS estimated_finish,
       j.last_error AS blocked_by
FROM cellcrypt.reencryption_job j JOIN pg_catalog.pg_class c ON c.oid = j.relid;
COMMENT ON VIEW @extschema@.data_encryption_progress IS 'Per table: re-encryption progress after a key change';

CREATE PROCEDURE @extschema@.finish_data_encryption_reencryption() LANGUAGE plpgsql AS $$
DECLARE
    s text;
    n bigint := 0;
    done bigint;
    remaining bigint;
BEGIN
    LOOP
        s := cellcrypt._reencrypt_step();
        n := n + 1;
        IF s IN ('idle', 'done', 'waiting', 'busy') OR n % 10 = 0 THEN
            SELECT coalesce(sum(cells_done), 0), coalesce(sum(cells_remaining), 0) INTO done, remaining FROM @extschema@.data_encryption_progress;
            RAISE NOTICE 'pg_cellcrypt re-encryption: % (% values re-encrypted, about % remaining)',
                CASE s WHEN 'idle' THEN 'nothing to do' WHEN 'done' THEN 'finished; older keys retired'
                       WHEN 'waiting' THEN 'waiting for transactions that began before the change'
                       WHEN 'busy' THEN 'the background worker holds the remaining work'
                       ELSE 'working' END, done, remaining;
        END IF;
        EXIT WHEN s IN ('idle', 'done');
        IF s = 'blocked' THEN
            COMMIT;
            RAISE EXCEPTION 'pg_cellcrypt re-encryption is blocked: %',
                (SELECT string_agg(last_error, '; ') FROM cellcrypt.reencryption_job WHERE last_error IS NOT NULL)
                USING ERRCODE = 'data_corrupted',
                      HINT = 'Restore that row from a backup or delete it (or set the value to NULL); then CALL finish_data_encryption_reencryption() again. The background worker retries on its own.';
        END IF;
        COMMIT;
        IF s IN ('waiting', 'busy') THEN
            PERFORM pg_catalog.pg_sleep(0.5);
        END IF;
    END LOOP;
END
$$;
COMMENT ON PROCEDURE @extschema@.finish_data_encryption_reencryption() IS 'Runs or finishes the re-encryption after a key change in the foreground, with NOTICE progress';
REVOKE ALL ON PROCEDURE @extschema@.finish_data_encryption_reencryption() FROM PUBLIC;
GRANT EXECUTE ON PROCEDURE @extschema@.finish_data_encryption_reencryption() TO data_encryption_admin;
GRANT USAGE ON SCHEMA cellcrypt TO data_encryption_admin;
GRANT EXECUTE ON FUNCTION cellcrypt._reencrypt_step() TO data_encryption_admin;
REVOKE ALL ON @extschema@.data_encryption_progress FROM PUBLIC;
GRANT SELECT ON @extschema@.data_encryption_progress TO data_encryption_admin;
"#,
    name = "reencryption",
    requires = ["roles", "types"]
);

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
//! ## Whose rights
//! The job bookkeeping runs as the extension's owner; every statement on a user table (the
//! batch's UPDATE, the verification's count) runs as **that table's owner**, under
//! `SECURITY_RESTRICTED_OPERATION`, with `search_path = pg_catalog, pg_temp` and every function
//! and operator qualified ([`crate::store::as_table_owner`]), as VACUUM and REINDEX run since
//! CVE-2022-1552. Ordinary (`ENABLE`) triggers do not fire (`session_replication_role =
//! replica`): re-encryption changes no value, only its envelope. What still runs (`ENABLE
//! ALWAYS` and `ENABLE REPLICA` triggers, index expressions, CHECK and domain constraints,
//! generated columns) runs with the owner's rights only. `row_security = off`: a table whose
//! owner forced row level security on itself makes the batch fail, and the work reports it as
//! blocked, instead of silently skipping the rows a policy hides. A failing batch, whatever the
//! cause, is reported the same way and retried.

use crate::audit::{self, Event};
use crate::backend_local::BackendLocal;
use crate::errors;
use crate::keys;
use crate::store;
use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode};
use std::cell::Cell;

fn spi_err(what: &str) -> impl Fn(pgrx::spi::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn fail(msg: String) -> ! {
    errors::raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, msg, None, None)
}

/// Records one job per table with encrypted columns; called by a key change. Returns how many.
pub fn create_jobs(version: u32) -> i64 {
    store::create_jobs(version)
}

/// `cellcrypt.key_version(c) <> v OR ...`: every function and operator in a schema only the
/// extension's owner controls.
fn filter(columns: &[String], version: i32) -> String {
    columns.iter().map(|c| format!("cellcrypt.key_version({c}) OPERATOR(pg_catalog.<>) {version}")).collect::<Vec<_>>().join(" OR ")
}

/// True while this backend runs a re-encryption batch: `cellcrypt.reencrypt()` works only then.
static IN_BATCH: BackendLocal<Cell<bool>> = BackendLocal::new(Cell::new(false));

/// Refuses `cellcrypt.reencrypt()` outside a batch (42501): it is the batch's own function.
pub fn require_batch() {
    if !IN_BATCH.with(|b| b.get()) {
        errors::raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "cellcrypt.reencrypt() is internal to pg_cellcrypt's re-encryption",
            None,
            Some("Use CALL finish_data_encryption_reencryption(); to run the re-encryption."),
        )
    }
}

/// Runs `f` with `cellcrypt.reencrypt()` enabled.
fn in_batch<R>(f: impl FnOnce() -> R) -> R {
    IN_BATCH.with(|b| b.set(true));
    let f = Cell::new(Some(f));
    PgTryBuilder::new(std::panic::AssertUnwindSafe(|| (f.take().expect("runs once"))()))
        .finally(|| IN_BATCH.with(|b| b.set(false)))
        .execute()
}

/// One unit of re-encryption work, in the caller's transaction. Returns what it did:
/// `batch`, `verify`, `busy` (another runner holds the only pending job), `waiting` (for
/// transactions older than the work), `blocked` (a batch failed: the job's `last_error` says
/// where and why, and the batch is tried again later), `done` (this call retired the old keys)
/// or `idle`. Refused on a standby.
///
/// The bookkeeping runs as the extension's owner, each table's statements as that table's
/// owner ([`store`]): nothing a table owner attached to a table runs with any other rights.
pub fn step() -> String {
    crate::policy::require_primary("re-encryption");
    step_inner().unwrap_or_else(|e| fail(e))
}

fn step_inner() -> Result<String, String> {
    store::drop_citus_shell_jobs()?;
    store::start_jobs()?;
    if let Some(job) = store::claim_job()? {
        return process(job);
    }
    let (pending, total) = store::job_counts()?;
    if total == 0 {
        // Older key versions without jobs (a database restored from a dump taken during a
        // change): plan the work now; they are retired only after it is verified.
        if !store::has_previous_keys()? || store::keep_previous_keys() {
            return Ok("idle".into());
        }
        let current = keys::loaded().current_version;
        store::create_jobs(current);
        store::plan_nothing_left()?;
        return Ok("verify".into());
    }
    if pending > 0 {
        return Ok("busy".into());
    }
    finish()
}

/// The table's size in blocks and its rows per block (an estimate from its statistics).
fn table_size(relid: pg_sys::Oid) -> Result<(i64, f64), String> {
    store::as_extension_owner(|| {
        Spi::get_two_with_args::<i64, f64>(
            "SELECT (pg_catalog.pg_relation_size(oid) OPERATOR(pg_catalog./) pg_catalog.current_setting('block_size')::pg_catalog.int4)::pg_catalog.int8, \
                    CASE WHEN relpages OPERATOR(pg_catalog.>) 0 AND reltuples OPERATOR(pg_catalog.>) 0 \
                         THEN reltuples OPERATOR(pg_catalog./) relpages ELSE 50 END::pg_catalog.float8 \
             FROM pg_catalog.pg_class WHERE oid OPERATOR(pg_catalog.=) $1",
            &[relid.into()],
        )
    })
    .map(|(a, b)| (a.unwrap_or(0), b.unwrap_or(50.0)))
    .map_err(spi_err("could not look up a table"))
}

fn process(job: store::Job) -> Result<String, String> {
    // The table, locked as an UPDATE locks it; gone (or no longer a plain table): the job goes.
    let Some(mut table) = store::lock_user_table(job.relid, pg_sys::RowExclusiveLock) else {
        store::drop_job(job.relid)?;
        return Ok("batch".into());
    };
    let (size_now, rows_per_block) = table_size(job.relid)?;
    // A pass covers the blocks the table had when the pass began: rows rewritten by the pass
    // land beyond them (or in freed space) and are already under the new key. Anything written
    // under an old key meanwhile is found by the verification in `finish`.
    let nblocks = if job.total_blocks > 0 { job.total_blocks } else { size_now };
    if job.next_block >= nblocks {
        store::job_verified(job.relid)?;
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
    let condition = filter(&job.columns, job.version);
    // The table is named, and the statement run, while no schema can be renamed.
    let outcome = store::with_stable_names(&mut table, false, |table| {
        let name = &table.name;
        // ONLY: an inheritance child is a job of its own, done as its own owner.
        let update = format!(
            "UPDATE ONLY {name} SET {set} WHERE ctid OPERATOR(pg_catalog.>=) '({},0)'::pg_catalog.tid AND ctid OPERATOR(pg_catalog.<) '({end},0)'::pg_catalog.tid AND ({condition})",
            job.next_block
        );
        // Values, not rows, are counted: those reencrypt() moved to the current key.
        let batch = || -> Result<i64, String> {
            let before = crate::types::resealed_count();
            store::as_table_owner(table, || in_batch(|| Spi::run(update.as_str()))).map_err(spi_err(&format!("could not re-encrypt table {name}")))?;
            crate::fault::point("reencrypt:batch_done");
            Ok((crate::types::resealed_count() - before) as i64)
        };
        catching_errors(batch).map_err(|message| {
            // A value that cannot be decrypted cannot be re-encrypted either, and the owner's
            // own code on the table (a trigger, a constraint) may refuse the update. The work
            // stops at this batch, says where, and is retried until the cause is fixed.
            format!(
                "{message} (a row in blocks {}..{end} of {name}: SELECT ctid FROM {name} WHERE ctid >= '({},0)' AND ctid < '({end},0)'; restore that row from a backup or delete it, or fix what refused the update)",
                job.next_block, job.next_block
            )
        })
    });
    let n = match outcome {
        None => return Ok("busy".into()),
        Some(Ok(n)) => n?,
        Some(Err(blocked)) => {
            store::job_blocked(job.relid, blocked)?;
            return Ok("blocked".into());
        }
    };
    store::job_progress(job.relid, end, nblocks, n)?;
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

/// Runs `f` in a subtransaction. An error (a value that does not decrypt or names a key version
/// this database does not have, or the table owner's own code refusing the update) rolls the
/// subtransaction back and comes back as its message; a cancel propagates as usual.
pub(crate) fn catching_errors<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    // SAFETY: the pattern of PostgreSQL's procedural languages for a subtransaction that may
    // fail: begin it, run the body, then release it or roll it back, restoring the caller's
    // memory context and resource owner either way.
    unsafe {
        let ctx = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(ctx);
        let f = std::cell::Cell::new(Some(f));
        let undo = || {
            pg_sys::MemoryContextSwitchTo(ctx);
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            pg_sys::MemoryContextSwitchTo(ctx);
            pg_sys::CurrentResourceOwner = owner;
        };
        let rollback = |e: pgrx::pg_sys::panic::CaughtError| {
            let message = match &e {
                pgrx::pg_sys::panic::CaughtError::PostgresError(r) | pgrx::pg_sys::panic::CaughtError::ErrorReport(r) => r.message().to_owned(),
                pgrx::pg_sys::panic::CaughtError::RustPanic { ereport, .. } => ereport.message().to_owned(),
            };
            undo();
            Err(message)
        };
        let r = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| Ok(f.take().expect("runs once")())))
            .catch_when(PgSqlErrorCode::ERRCODE_QUERY_CANCELED, |e| {
                undo();
                e.rethrow()
            })
            .catch_others(rollback)
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
    if !store::lock_all_jobs()? {
        return Ok("busy".into());
    }
    // What may still hold or write values under an older key keeps the older keys alive until
    // it is gone: other sessions' temporary tables (no one else can read them), prepared
    // transactions, and transactions that began before the last table's pass ended (their
    // snapshots may still see old-key values and copy them anywhere). Only then are tables
    // made, or given encrypted columns, by such transactions planned, and every table counted
    // once more.
    // On a Citus node nothing is retired (store::keep_previous_keys), and every distributed
    // write is briefly a prepared transaction there: nothing to wait for.
    if let Some(reason) = if store::keep_previous_keys() { None } else { store::retirement_waits_for()? } {
        store::jobs_note(format!("waiting: {reason} may hold values under an older key"))?;
        return Ok("waiting".into());
    }
    let current = keys::loaded().current_version;
    if store::create_jobs(current) > 0 {
        return Ok("verify".into());
    }
    let mut again = false;
    for (relid, version, columns) in store::live_jobs()? {
        // Counted as the table's owner, with row_security off: every row is seen or the count
        // fails (and the work says so), never a filtered view of the table.
        let Some(mut table) = store::lock_user_table(relid, pg_sys::AccessShareLock) else { continue };
        let counted = store::with_stable_names(&mut table, false, |table| {
            // ONLY: an inheritance child is a job of its own, done as its own owner.
            let count = format!("SELECT pg_catalog.count(*) FROM ONLY {} WHERE {}", table.name, filter(&columns, version));
            catching_errors(|| store::as_table_owner(table, || Spi::get_one::<i64>(&count))).map_err(|m| format!("{m} (while verifying {})", table.name))
        });
        let left = match counted {
            None => return Ok("busy".into()),
            Some(Ok(r)) => r.map_err(spi_err("could not verify a table"))?.unwrap_or(0),
            Some(Err(message)) => {
                store::job_blocked(relid, message)?;
                return Ok("blocked".into());
            }
        };
        if left > 0 {
            again = true;
            store::job_again(relid)?;
        }
    }
    if again {
        return Ok("verify".into());
    }
    // Materialized views are not rewritten; one that still holds old-key values must be
    // refreshed (from its re-encrypted tables) before the older keys go.
    for (relid, columns) in store::materialized_views()? {
        let Some(mut view) = store::lock_user_relation(relid, pg_sys::AccessShareLock, b'm') else { continue };
        let counted = store::with_stable_names(&mut view, false, |view| {
            let count = format!("SELECT pg_catalog.count(*) FROM {} WHERE {}", view.name, filter(&columns, current as i32));
            catching_errors(|| store::as_table_owner(view, || Spi::get_one::<i64>(&count))).map_err(|m| format!("{m} (while verifying materialized view {})", view.name))
        });
        let left = match counted {
            None => return Ok("busy".into()),
            Some(Ok(r)) => r.map_err(spi_err("could not verify a materialized view"))?.unwrap_or(0),
            Some(Err(message)) => {
                store::jobs_note(message)?;
                return Ok("blocked".into());
            }
        };
        if left > 0 {
            store::jobs_note(format!(
                "materialized view {0} holds {left} values under an older key: REFRESH MATERIALIZED VIEW {0}; (it is refreshed from its re-encrypted tables)",
                view.name
            ))?;
            return Ok("blocked".into());
        }
    }
    // Every value is under the current key: retire the older versions.
    let (retired, cells, version, fingerprint) = store::retire_previous_keys()?;
    crate::fault::point("reencrypt:retired");
    let detail = if store::keep_previous_keys() {
        format!("{} values re-encrypted; older key versions kept (a node of a Citus cluster)", cells.unwrap_or(0))
    } else {
        format!("{} values re-encrypted; retired key versions: {}", cells.unwrap_or(0), retired.as_deref().unwrap_or("none"))
    };
    audit::record(&Event {
        action: "reencryption",
        outcome: "completed",
        key_version: version.map(|v| v as u32),
        fingerprint: fingerprint.as_deref(),
        detail: &detail,
    });
    crate::keystate::announce_at_commit();
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
    crate::policy::require_admin("finish_data_encryption_reencryption()");
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
    state        text NOT NULL DEFAULT 'pending' CHECK (state OPERATOR(pg_catalog.=) ANY ('{pending,verified}'::pg_catalog.text[])),
    next_block   bigint NOT NULL DEFAULT 0,
    total_blocks bigint NOT NULL DEFAULT 0,
    pass         integer NOT NULL DEFAULT 1,
    cells_done   bigint NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    created_by   name NOT NULL DEFAULT session_user,
    started_at   timestamptz,
    updated_at   timestamptz,
    -- when the table's last pass ended: transactions older than every table's are waited for
    verified_at  timestamptz,
    last_error   text
);
COMMENT ON TABLE cellcrypt.reencryption_job IS 'Re-encryption work left after a key change; see the view data_encryption_progress';
CREATE FUNCTION cellcrypt._reencrypt_step() RETURNS text
    AS 'MODULE_PATHNAME', 'cellcrypt_reencrypt_step' LANGUAGE c VOLATILE;
-- Executable by PUBLIC: it refuses non-administrators itself (policy.rs), with a hint.

-- Every function and operator is qualified (and typed to match exactly): a view is parsed
-- once, at CREATE EXTENSION, where the search_path is the extension's schema, which other roles
-- may be able to create objects in.
-- On a Citus coordinator: each worker's progress rows (its shards, named by the distributed
-- table they belong to), through Citus' run_command_on_workers as the calling role. Nothing
-- without Citus or on a worker; names nothing of Citus' unless Citus is there (EXECUTE).
CREATE FUNCTION cellcrypt._workers_progress(OUT table_name pg_catalog.oid, OUT key_version pg_catalog.int4,
        OUT state pg_catalog.text, OUT pass pg_catalog.int4, OUT cells_done pg_catalog.int8, OUT cells_remaining pg_catalog.int8,
        OUT rows_per_second pg_catalog.int8, OUT estimated_finish pg_catalog.timestamptz, OUT blocked_by pg_catalog.text,
        OUT node pg_catalog.text)
    RETURNS SETOF record LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $f$
BEGIN
    IF to_regproc('pg_catalog.run_command_on_workers') IS NULL OR to_regclass('pg_catalog.pg_dist_local_group') IS NULL THEN
        RETURN;
    END IF;
    IF NOT (SELECT g.groupid = 0 FROM pg_catalog.pg_dist_local_group g) THEN
        RETURN;
    END IF;
    RETURN QUERY EXECUTE $q$
        SELECT (SELECT s.logicalrelid::pg_catalog.oid FROM pg_catalog.pg_dist_shard s
                 WHERE s.shardid = pg_catalog.substring(p.shard, '_([0-9]+)"?$')::pg_catalog.int8),
               p.key_version, p.state, p.pass, p.cells_done, p.cells_remaining, p.rows_per_second,
               p.estimated_finish, p.blocked_by, w.nodename || ':' || w.nodeport
          FROM pg_catalog.run_command_on_workers(pg_catalog.format(
                   'SELECT coalesce(pg_catalog.json_agg(pg_catalog.json_build_object(''shard'', table_name::pg_catalog.text, ''key_version'', key_version, '
                   '''state'', state, ''pass'', pass, ''cells_done'', cells_done, ''cells_remaining'', cells_remaining, '
                   '''rows_per_second'', rows_per_second, ''estimated_finish'', estimated_finish, ''blocked_by'', blocked_by)), ''[]'') '
                   'FROM %I.data_encryption_progress WHERE node OPERATOR(pg_catalog.=) ''local''', $1)) w,
               LATERAL pg_catalog.json_to_recordset(CASE WHEN w.success THEN w.result::pg_catalog.json ELSE '[]'::pg_catalog.json END)
                   AS p(shard text, key_version int4, state text, pass int4, cells_done int8, cells_remaining int8,
                        rows_per_second int8, estimated_finish timestamptz, blocked_by text)
    $q$ USING (SELECT n.nspname FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
                WHERE e.extname = 'pg_cellcrypt');
END
$f$;
REVOKE ALL ON FUNCTION cellcrypt._workers_progress() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cellcrypt._workers_progress() TO data_encryption_admin;

CREATE VIEW @extschema@.data_encryption_progress AS
SELECT j.relid::pg_catalog.regclass AS table_name,
       j.key_version,
       j.state,
       j.pass,
       j.cells_done,
       CASE WHEN j.state OPERATOR(pg_catalog.=) 'verified' THEN 0::pg_catalog.int8
            ELSE pg_catalog.round(r.cells)::pg_catalog.int8 END AS cells_remaining,
       CASE WHEN j.updated_at OPERATOR(pg_catalog.>) j.started_at
            THEN pg_catalog.round(j.cells_done::pg_catalog.float8
                      OPERATOR(pg_catalog./) pg_catalog.array_length(j.columns, 1)::pg_catalog.float8
                      OPERATOR(pg_catalog./) pg_catalog.date_part('epoch', j.updated_at OPERATOR(pg_catalog.-) j.started_at))::pg_catalog.int8 END AS rows_per_second,
       CASE WHEN j.state OPERATOR(pg_catalog.=) 'verified' THEN j.updated_at
            WHEN j.updated_at OPERATOR(pg_catalog.>) j.started_at AND j.cells_done OPERATOR(pg_catalog.>) 0::pg_catalog.int8
            THEN pg_catalog.now() OPERATOR(pg_catalog.+) (r.cells OPERATOR(pg_catalog.*)
                      ((j.updated_at OPERATOR(pg_catalog.-) j.started_at) OPERATOR(pg_catalog./) j.cells_done::pg_catalog.float8)) END AS estimated_finish,
       j.last_error AS blocked_by,
       'local'::pg_catalog.text AS node
FROM cellcrypt.reencryption_job j
JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) j.relid,
LATERAL (SELECT GREATEST(c.reltuples::pg_catalog.float8, 0::pg_catalog.float8)
                OPERATOR(pg_catalog.*) pg_catalog.array_length(j.columns, 1)::pg_catalog.float8
                OPERATOR(pg_catalog.*) (1::pg_catalog.float8 OPERATOR(pg_catalog.-)
                    LEAST(1::pg_catalog.float8, j.next_block::pg_catalog.float8 OPERATOR(pg_catalog./) GREATEST(j.total_blocks, 1::pg_catalog.int8)::pg_catalog.float8))) r(cells)
UNION ALL
SELECT w.table_name::pg_catalog.regclass, w.key_version, w.state, w.pass, w.cells_done, w.cells_remaining,
       w.rows_per_second, w.estimated_finish, w.blocked_by, w.node
FROM cellcrypt._workers_progress() w;
COMMENT ON VIEW @extschema@.data_encryption_progress IS 'Per table: re-encryption progress after a key change (on a Citus coordinator, also each worker''s shards: node names the worker, table_name the distributed table)';

-- The procedure commits between batches, so it cannot pin its search_path with a SET clause:
-- it runs with the caller's, and names nothing through it (every function and operator is
-- qualified, with argument types that match exactly). The reports come from functions that
-- pin theirs and read only the extension's own schema, which only its owner can rename.
CREATE FUNCTION cellcrypt._reencryption_totals(OUT done pg_catalog.int8, OUT remaining pg_catalog.int8) LANGUAGE sql STABLE
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(sum(j.cells_done), 0)::int8,
           coalesce(sum(CASE WHEN j.state = 'verified' THEN 0
                             ELSE round(greatest(c.reltuples, 0) * array_length(j.columns, 1)
                                        * (1 - least(1, j.next_block::float8 / greatest(j.total_blocks, 1)))) END), 0)::int8
    FROM cellcrypt.reencryption_job j JOIN pg_class c ON c.oid = j.relid
$$;
CREATE FUNCTION cellcrypt._reencryption_blocked_by() RETURNS text LANGUAGE sql STABLE
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT string_agg(DISTINCT last_error, '; ') FROM cellcrypt.reencryption_job WHERE last_error IS NOT NULL
$$;
REVOKE ALL ON FUNCTION cellcrypt._reencryption_totals(), cellcrypt._reencryption_blocked_by() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cellcrypt._reencryption_totals(), cellcrypt._reencryption_blocked_by() TO data_encryption_admin;
CREATE FUNCTION cellcrypt._reencryption_report(step text) RETURNS text LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp AS $$
    SELECT format('pg_cellcrypt re-encryption: %s (%s values re-encrypted, about %s remaining)',
                  CASE step WHEN 'idle' THEN 'nothing to do' WHEN 'done' THEN 'finished; older keys retired'
                            WHEN 'waiting' THEN 'waiting for what began before the change (see data_encryption_status)'
                            WHEN 'busy' THEN 'the background worker holds the remaining work'
                            ELSE 'working' END, t.done, t.remaining)
    FROM cellcrypt._reencryption_totals() t
$$;
CREATE PROCEDURE @extschema@.finish_data_encryption_reencryption() LANGUAGE plpgsql AS $$
DECLARE
    s pg_catalog.text;
    n pg_catalog.int4 := 0;
BEGIN
    LOOP
        s := cellcrypt._reencrypt_step();
        n := n OPERATOR(pg_catalog.+) 1;
        IF s OPERATOR(pg_catalog.=) ANY ('{idle,done,waiting,busy}'::pg_catalog.text[])
           OR (n OPERATOR(pg_catalog.%) 10) OPERATOR(pg_catalog.=) 0 THEN
            RAISE NOTICE '%', cellcrypt._reencryption_report(s);
        END IF;
        EXIT WHEN s OPERATOR(pg_catalog.=) ANY ('{idle,done}'::pg_catalog.text[]);
        IF s OPERATOR(pg_catalog.=) 'blocked' THEN
            COMMIT;
            RAISE EXCEPTION 'pg_cellcrypt re-encryption is blocked: %', cellcrypt._reencryption_blocked_by()
                USING ERRCODE = 'data_corrupted',
                      HINT = 'Fix what the message names: a row that does not decrypt (restore it from a backup or delete it), a table owner''s forced row level security, a materialized view to refresh. Then CALL finish_data_encryption_reencryption() again; the background worker retries on its own.';
        END IF;
        COMMIT;
        IF s OPERATOR(pg_catalog.=) ANY ('{waiting,busy}'::pg_catalog.text[]) THEN
            PERFORM pg_catalog.pg_sleep(0.5::pg_catalog.float8);
        END IF;
    END LOOP;
END
$$;
COMMENT ON PROCEDURE @extschema@.finish_data_encryption_reencryption() IS 'Runs or finishes the re-encryption after a key change in the foreground, with NOTICE progress';
-- Executable by PUBLIC: cellcrypt._reencrypt_step() refuses non-administrators.
REVOKE ALL ON @extschema@.data_encryption_progress FROM PUBLIC;
GRANT SELECT ON @extschema@.data_encryption_progress TO data_encryption_admin;
"#,
    name = "reencryption",
    requires = ["roles", "types"]
);

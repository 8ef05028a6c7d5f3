//! Re-encryption: moving every encrypted value of the database under the current key.
//!
//! Until the background re-encryption worker exists, a key change re-encrypts inside
//! `set_data_encryption_key`, in its transaction: one `UPDATE` per table that holds encrypted
//! columns, touching only rows with a value under an older key version. Values written
//! concurrently under the old key (by transactions that began before the change committed)
//! stay readable, because older versions keep their wrapped data key.
//!
//! What it covers: every column of an encrypted type in ordinary tables and partitions the
//! database holds (temporary tables of other sessions excepted). Encrypted values inside arrays,
//! composite types or materialized views are not rewritten; they stay readable through the
//! previous versions' keys.
//!
//! The updates run as the extension's owner (so a `data_encryption_admin` who is not the owner
//! of every table can change the key), with `session_replication_role = replica`, so user
//! triggers do not fire: re-encryption does not change any value, only its envelope.

use crate::errors;
use crate::keys;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

/// The columns to re-encrypt, as (table, [column]) with quoted identifiers.
fn encrypted_columns() -> Vec<(String, Vec<String>)> {
    let rows: Vec<(String, String)> = Spi::connect(|c| {
        let t = c.select(
            "SELECT c.oid::pg_catalog.regclass::text, pg_catalog.quote_ident(a.attname) \
             FROM pg_catalog.pg_attribute a \
             JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
             WHERE a.atttypid IN (SELECT d.objid FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid \
                                  WHERE e.extname = 'pg_cellcrypt' AND d.classid = 'pg_catalog.pg_type'::pg_catalog.regclass AND d.deptype = 'e') \
               AND c.relkind = 'r' AND c.relpersistence <> 't' AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY c.oid, a.attnum",
            None,
            &[],
        )?;
        let mut out = Vec::new();
        for r in t {
            out.push((r.get::<String>(1)?.unwrap_or_default(), r.get::<String>(2)?.unwrap_or_default()));
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .unwrap_or_else(|e| errors::raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("could not list encrypted columns: {e}"), None, None));
    let mut tables: Vec<(String, Vec<String>)> = Vec::new();
    for (t, c) in rows {
        match tables.last_mut() {
            Some((last, cols)) if *last == t => cols.push(c),
            _ => tables.push((t, vec![c])),
        }
    }
    tables
}

/// Re-encrypts every value not under `version`; returns how many rows were rewritten.
pub fn reencrypt_all(version: u32) -> i64 {
    keys::as_extension_owner(|| {
        let previous_role: String = Spi::get_one("SELECT pg_catalog.current_setting('session_replication_role')").ok().flatten().unwrap_or_else(|| "origin".into());
        Spi::run("SELECT pg_catalog.set_config('session_replication_role', 'replica', true)")
            .unwrap_or_else(|e| errors::raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("could not prepare re-encryption: {e}"), None, None));
        let schema: String = Spi::get_one("SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'pg_cellcrypt'")
            .ok()
            .flatten()
            .unwrap_or_else(|| "public".into());
        let mut total = 0i64;
        for (table, cols) in encrypted_columns() {
            let set = cols.iter().map(|c| format!("{c} = cellcrypt.reencrypt({c})")).collect::<Vec<_>>().join(", ");
            let filter = cols.iter().map(|c| format!("{schema}.encryption_key_version({c}) <> {version}")).collect::<Vec<_>>().join(" OR ");
            let sql = format!("UPDATE {table} SET {set} WHERE {filter}");
            let n = Spi::connect_mut(|c| c.update(sql.as_str(), None, &[]).map(|t| t.len() as i64))
                .unwrap_or_else(|e| errors::raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("could not re-encrypt table {table}: {e}"), None, None));
            total += n;
        }
        Spi::run_with_args("SELECT pg_catalog.set_config('session_replication_role', $1, true)", &[previous_role.into()])
            .unwrap_or_else(|e| errors::raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("could not finish re-encryption: {e}"), None, None));
        total
    })
}

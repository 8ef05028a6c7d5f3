//! Blind indexes on encrypted columns: equality lookups and unique constraints through an
//! ordinary btree expression index (the construction is in `cellcrypt_core::blind`).
//!
//! ```sql
//! CREATE UNIQUE INDEX customer_email_bidx ON customer (blind_index(email, 'lower_trim'));
//! SELECT id FROM customer WHERE blind_index(email, 'lower_trim') = blind_index($1, 'lower_trim');
//! ```
//!
//! * `blind_index(encrypted_text, normalization)` decrypts inside the server and returns only
//!   the 16-byte keyed hash; `blind_index(text, normalization)` hashes the value looked up.
//!   Both are IMMUTABLE (the index key changes only through [`rotate_blind_index_key`], which
//!   rebuilds every index that uses them in the same transaction), STRICT and PARALLEL SAFE.
//!   Neither needs `data_encryption_reader`: a writer must be able to maintain the index.
//! * The index key is random, independent of the data key, and stored only wrapped under the
//!   current data key (`cellcrypt.index_key`). A data key change re-wraps it, so blind indexes
//!   need no rebuild.
//! * Normalizations: `exact` (default), `lower`, `trim`, `lower_trim` (Unicode, locale-free).
//!   The same normalization must be used on both sides of the comparison.

use crate::errors;
use crate::key_admin;
use crate::keys;
use crate::types::{self, arg, v1_function, Kind};
use cellcrypt_core::blind::{self, Normalization, BLIND_INDEX_LEN};
use cellcrypt_core::SecretKey;
use pgrx::pg_sys::{self, Datum};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

/// The single-flight lock of index key rotations: `pg_try_advisory_xact_lock(1667464497, 2)`.
const ROTATION_LOCK_OBJID: i32 = 2;

unsafe fn normalization(fcinfo: pg_sys::FunctionCallInfo) -> Normalization {
    let name = String::from_utf8_lossy(types::varlena_bytes(arg(fcinfo, 1))).into_owned();
    Normalization::parse(&name).unwrap_or_else(|| {
        errors::raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("unknown blind index normalization \"{name}\""),
            None,
            Some(&format!("Use one of: {}.", Normalization::NAMES.join(", "))),
        )
    })
}

fn hash_text(norm: Normalization, value: &[u8]) -> Datum {
    let keys = keys::loaded();
    let Some((_, key)) = keys.index_key.as_ref() else {
        errors::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "this database has no blind-index key",
            None,
            Some("Create one with SELECT rotate_blind_index_key(); as an administrator."),
        )
    };
    let out = if norm == Normalization::Exact {
        blind::blind_index(key, "text", norm, value)
    } else {
        let Ok(text) = std::str::from_utf8(value) else {
            errors::raise(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "blind index normalizations other than \"exact\" need a UTF8 database",
                None,
                Some("Use the \"exact\" normalization, or normalize the value in SQL before storing it."),
            )
        };
        let normalized = zeroize::Zeroizing::new(norm.apply(text).into_owned());
        blind::blind_index(key, "text", norm, normalized.as_bytes())
    };
    types::new_varlena(BLIND_INDEX_LEN, |o| o.copy_from_slice(&out))
}

// blind_index(encrypted_text, normalization text) → bytea
v1_function!(pg_finfo_cellcrypt_blind_index_encrypted, cellcrypt_blind_index_encrypted, |fcinfo| {
    let norm = normalization(fcinfo);
    let plain = types::open_to_vec(
        Kind::Text,
        arg(fcinfo, 0),
        "compute the blind index of",
        "The value comes from another database or was encrypted under a retired key.",
    );
    hash_text(norm, &plain)
});

// blind_index(text, normalization text) → bytea
v1_function!(pg_finfo_cellcrypt_blind_index_text, cellcrypt_blind_index_text, |fcinfo| {
    let norm = normalization(fcinfo);
    hash_text(norm, types::varlena_bytes(arg(fcinfo, 0)))
});

/// `rotate_blind_index_key() returns text`: replaces the blind-index key with a fresh random
/// one and rebuilds every index that uses `blind_index`, in one transaction (so no lookup ever
/// mixes keys), with a NOTICE per index. Administrators only, over a secure connection; one
/// rotation at a time (55P03).
#[pg_extern(volatile, parallel_unsafe)]
fn rotate_blind_index_key() -> String {
    const F: &str = "rotate_blind_index_key()";
    key_admin::require_admin(F);
    key_admin::require_primary(F);
    key_admin::require_secure_transport(F, F);
    if !key_admin::try_xact_lock(ROTATION_LOCK_OBJID) {
        errors::raise(
            PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
            "another blind-index key rotation is in progress in this database",
            None,
            Some("Wait for it to finish, then try again if still needed."),
        );
    }
    refuse_generated_columns();
    let loaded = keys::loaded();
    let old_version = loaded.index_key.as_ref().map(|(v, _)| *v).unwrap_or(0);
    let new_version = old_version + 1;
    let new_key = SecretKey::random();
    keys::as_extension_owner(|| Spi::run("UPDATE cellcrypt.index_key SET state = 'retired', wrapped_key = NULL WHERE state = 'current'"))
        .unwrap_or_else(|e| errors::raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("could not retire the blind-index key: {e}"), None, None));
    key_admin::store_index_key(new_version, &loaded.master, loaded.current_version, &new_key, true);
    // This transaction computes with the new key from here on; others at its commit.
    let rebuilt = {
        let master = cellcrypt_core::MasterKey::from_bytes(*loaded.master.expose());
        let others: Vec<(u32, SecretKey)> = loaded
            .data_keys
            .iter()
            .filter(|(v, _)| *v != loaded.current_version)
            .filter_map(|(v, k)| SecretKey::from_slice(k.expose()).map(|k| (*v, k)))
            .collect();
        keys::install(keys::LoadedKeys::build(keys::keyring_relid(), keys::generation_now(), loaded.current_version, master, others, Some((new_version, new_key))));
        drop(loaded);
        key_admin::announce_at_commit();
        rebuild_indexes()
    };
    crate::audit::record(&crate::audit::Event {
        action: "rotate blind index key",
        outcome: "started",
        key_version: Some(new_version),
        fingerprint: None,
        detail: &format!("{rebuilt} indexes rebuilt"),
    });
    format!("rotated: blind-index key version {new_version} is current; {rebuilt} indexes rebuilt")
}

/// The `blind_index` functions of this extension, as a SQL subquery of their OIDs.
const BLIND_INDEX_FUNCTIONS: &str = "SELECT p.oid FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_depend e ON e.objid = p.oid \
     JOIN pg_catalog.pg_extension x ON x.oid = e.refobjid WHERE x.extname = 'pg_cellcrypt' AND p.proname = 'blind_index'";

/// A rotation rebuilds indexes; a stored generated column computed with `blind_index` would
/// keep hashes under the old key and silently stop matching, so the rotation is refused.
fn refuse_generated_columns() {
    let columns: Option<String> = keys::as_extension_owner(|| {
        Spi::get_one::<String>(&format!(
            "SELECT string_agg(format('%s.%I', a.adrelid::pg_catalog.regclass, t.attname), ', ') \
             FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_attrdef a ON a.oid = d.objid \
             JOIN pg_catalog.pg_attribute t ON t.attrelid = a.adrelid AND t.attnum = a.adnum \
             WHERE d.classid = 'pg_catalog.pg_attrdef'::pg_catalog.regclass \
               AND d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND d.refobjid IN ({BLIND_INDEX_FUNCTIONS})"
        ))
        .ok()
        .flatten()
    });
    if let Some(columns) = columns {
        errors::raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("cannot rotate the blind-index key: column {columns} stores blind indexes computed with the current key"),
            Some("A rotation rebuilds expression indexes; stored values in columns are not recomputed."),
            Some("Replace the column with an expression index on blind_index(...), then rotate."),
        );
    }
}

/// Rebuilds every index whose definition calls `blind_index` (found through pg_depend).
fn rebuild_indexes() -> i64 {
    let indexes: Vec<String> = keys::as_extension_owner(|| {
        Spi::connect(|c| {
            let t = c.select(
                format!(
                    "SELECT DISTINCT d.objid::pg_catalog.regclass::text FROM pg_catalog.pg_depend d \
                 JOIN pg_catalog.pg_class i ON i.oid = d.objid AND i.relkind IN ('i', 'I') \
                 WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass \
                   AND d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass \
                   AND d.refobjid IN ({BLIND_INDEX_FUNCTIONS}) \
                 ORDER BY 1"
                )
                .as_str(),
                None,
                &[],
            )?;
            let mut out = Vec::new();
            for r in t {
                out.push(r.get::<String>(1)?.unwrap_or_default());
            }
            Ok::<_, pgrx::spi::Error>(out)
        })
        .unwrap_or_else(|e| errors::raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("could not list blind indexes: {e}"), None, None))
    });
    let total = indexes.len();
    for (i, index) in indexes.iter().enumerate() {
        keys::as_extension_owner(|| Spi::run(&format!("REINDEX INDEX {index}")))
            .unwrap_or_else(|e| errors::raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("could not rebuild index {index}: {e}"), None, None));
        pgrx::notice!("pg_cellcrypt: rebuilt blind index {} ({} of {total})", index, i + 1);
    }
    total as i64
}

pgrx::extension_sql!(
    r#"
-- Blind indexes (blind_index.rs): a keyed hash of the normalized plaintext, for expression
-- indexes and unique constraints. One overload reads the encrypted column, one hashes the
-- value being looked up.
CREATE FUNCTION @extschema@.blind_index(@extschema@.encrypted_text, normalization text DEFAULT 'exact') RETURNS bytea
    AS 'MODULE_PATHNAME', 'cellcrypt_blind_index_encrypted' LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION @extschema@.blind_index(text, normalization text DEFAULT 'exact') RETURNS bytea
    AS 'MODULE_PATHNAME', 'cellcrypt_blind_index_text' LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION @extschema@.blind_index(@extschema@.encrypted_text, text) IS 'Blind index of an encrypted value: HMAC-SHA256 under the index key, 16 bytes; reveals equality';
COMMENT ON FUNCTION @extschema@.blind_index(text, text) IS 'Blind index of a plaintext value, to look up an encrypted column by its blind index';
"#,
    name = "blind_index",
    requires = ["types"]
);

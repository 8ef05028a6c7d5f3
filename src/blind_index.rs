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
use crate::policy;
use crate::store;
use crate::backend_local::BackendLocal;
use crate::types::{self, arg, v1_function, Kind};
use cellcrypt_core::blind::{self, Normalization, BLIND_INDEX_LEN};
use cellcrypt_core::SecretKey;
use pgrx::pg_sys::{self, Datum};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use std::cell::RefCell;
use std::ffi::CStr;

fn parse_normalization(name: &str) -> Normalization {
    Normalization::parse(name).unwrap_or_else(|| {
        errors::raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("unknown blind index normalization \"{name}\""),
            None,
            Some(&format!("Use one of: {}.", Normalization::NAMES.join(", "))),
        )
    })
}

/// The normalization of registered column `id`, cached per backend and installation of the
/// extension (a registration never changes; a column registered again gets a new id). The
/// installation is told by the keyring's OID (`keyring`), which the loaded keys hold already:
/// looking the extension up by name each time (a catalog scan) cost more than the hash.
fn column_normalization(id: u32, keyring: pg_sys::Oid) -> Normalization {
    static CACHE: BackendLocal<RefCell<Vec<(pg_sys::Oid, u32, Normalization)>>> = BackendLocal::new(RefCell::new(Vec::new()));
    let ext = keyring;
    if let Some(n) = CACHE.with(|c| c.borrow().iter().find(|(e, i, _)| *e == ext && *i == id).map(|(_, _, n)| *n)) {
        return n;
    }
    let Some(name) = store::blind_index_normalization(id) else {
        errors::raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("blind-index column {id} is not registered in this database"),
            Some("The value or column is bound to a blind-index registration this database does not have (it comes from another database, or its registration was not restored)."),
            Some("Restore cellcrypt.blind_index_column with the rest of the dump, or register the column again."),
        )
    };
    let n = parse_normalization(&name);
    CACHE.with(|c| c.borrow_mut().push((ext, id, n)));
    n
}

/// The blind index of `value` for registered column `id`: normalized as registered, hashed
/// under that column's own key.
fn hash_column(id: u32, value: &[u8]) -> Datum {
    let keys = keys::loaded();
    let norm = column_normalization(id, keys.keyring_relid());
    let Some((_, key)) = keys.index_key.as_ref() else {
        errors::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "this database has no blind-index key",
            None,
            Some("Create one with SELECT rotate_blind_index_key(); as an administrator."),
        )
    };
    let key = {
        let mut kept = keys.column_index_keys.borrow_mut();
        match kept.iter().find(|(c, _)| *c == id) {
            Some((_, k)) => k.clone(),
            None => {
                let k = std::rc::Rc::new(blind::ColumnIndexKey::for_column(key, id));
                kept.push((id, k.clone()));
                k
            }
        }
    };
    let out = if norm == Normalization::Exact {
        key.index("text", norm, value)
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
        key.index("text", norm, normalized.as_bytes())
    };
    types::new_varlena(BLIND_INDEX_LEN, |o| o.copy_from_slice(&out))
}

/// A column of a table: its type, typmod and number; raises 42703 when there is none.
fn attribute(relid: pg_sys::Oid, column: &CStr) -> (pg_sys::Oid, i32, i16) {
    // SAFETY: a syscache lookup, released before returning; NULL for a missing or dropped column.
    unsafe {
        let tup = pg_sys::SearchSysCacheAttName(relid, column.as_ptr());
        if tup.is_null() {
            errors::raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                format!("column \"{}\" of relation {} does not exist", column.to_string_lossy(), relation_name(relid)),
                None,
                None,
            )
        }
        let att = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_attribute>(tup);
        let out = ((*att).atttypid, (*att).atttypmod, (*att).attnum);
        pg_sys::ReleaseSysCache(tup);
        out
    }
}

fn relation_name(relid: pg_sys::Oid) -> String {
    // SAFETY: returns a palloc'd name, or NULL for a missing relation.
    unsafe {
        let p = pg_sys::get_rel_name(relid);
        if p.is_null() { format!("with OID {}", relid.to_u32()) } else { CStr::from_ptr(p).to_string_lossy().into_owned() }
    }
}

fn not_registered(relid: pg_sys::Oid, column: &CStr) -> ! {
    let (table, column) = (relation_name(relid), column.to_string_lossy());
    errors::raise(
        PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!("column \"{column}\" of table {table} is not registered for a blind index"),
        Some("Blind indexes reveal which values are equal, so they exist only for the columns an administrator registered."),
        Some(&format!("An administrator registers it with SELECT register_blind_index('{table}', '{column}', 'exact');.")),
    )
}

// blind_index(encrypted_text) → bytea: the blind index of a value of a registered column.
v1_function!(pg_finfo_cellcrypt_blind_index_encrypted, cellcrypt_blind_index_encrypted, |fcinfo| {
    let d = arg(fcinfo, 0);
    let id = types::binding_of(d);
    if id == 0 {
        errors::raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "permission denied to compute the blind index of a value from a column not registered for a blind index",
            Some("Blind indexes reveal which values are equal, so they exist only for the columns an administrator registered; values of other columns (and values copied out of them) have none."),
            Some("An administrator registers the column with SELECT register_blind_index('<table>', '<column>', 'exact');."),
        )
    }
    let plain = types::open_to_vec(
        Kind::Text,
        d,
        "compute the blind index of",
        "The value comes from another database or was encrypted under a retired key.",
    );
    hash_column(id, &plain)
});

// blind_index(value text, table_name regclass, column_name name) → bytea: the blind index a
// value would have in a registered column, to look it up.
v1_function!(pg_finfo_cellcrypt_blind_index_lookup, cellcrypt_blind_index_lookup, |fcinfo| {
    let relid = pg_sys::Oid::from(arg(fcinfo, 1).value() as u32);
    let column = CStr::from_ptr(arg(fcinfo, 2).cast_mut_ptr::<std::ffi::c_char>());
    // The column's id, kept per call site: a lookup in a loop resolves it once.
    let flinfo = (*fcinfo).flinfo;
    let mut name = [0u8; pg_sys::NAMEDATALEN as usize];
    let bytes = column.to_bytes();
    let len = bytes.len().min(name.len());
    name[..len].copy_from_slice(&bytes[..len]);
    let id = match types::fn_extra::<(pg_sys::Oid, [u8; pg_sys::NAMEDATALEN as usize], u32)>(flinfo) {
        Some((r, n, id)) if r == relid && n == name => id,
        _ => {
            let (typid, typmod, _) = attribute(relid, column);
            if !types::is_encrypted_text(typid) || typmod <= 0 {
                not_registered(relid, column);
            }
            types::set_fn_extra(flinfo, (relid, name, typmod as u32));
            typmod as u32
        }
    };
    hash_column(id, types::varlena_bytes(arg(fcinfo, 0)))
});

// register_blind_index(table_name regclass, column_name name, normalization text) → text
v1_function!(pg_finfo_cellcrypt_register_blind_index, cellcrypt_register_blind_index, |fcinfo| {
    const F: &str = "register_blind_index()";
    policy::require_admin(F);
    policy::require_primary(F);
    let relid = pg_sys::Oid::from(arg(fcinfo, 0).value() as u32);
    let column = CStr::from_ptr(arg(fcinfo, 1).cast_mut_ptr::<std::ffi::c_char>()).to_owned();
    let norm = parse_normalization(&String::from_utf8_lossy(types::varlena_bytes(arg(fcinfo, 2))));
    let Some(mut table) = store::lock_user_table(relid, pg_sys::AccessExclusiveLock) else {
        errors::raise(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            format!("{} is not a table", relation_name(relid)),
            Some("Blind indexes are registered on columns of ordinary, permanent tables."),
            None,
        )
    };
    let (typid, typmod, _) = attribute(relid, &column);
    if !types::is_encrypted_text(typid) {
        errors::raise(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!("column \"{}\" of table {} is not of type encrypted_text", column.to_string_lossy(), table.name),
            None,
            Some("Blind indexes exist for encrypted_text columns."),
        )
    }
    if typmod > 0 {
        errors::raise(
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            format!("column \"{}\" of table {} is already registered for a blind index", column.to_string_lossy(), table.name),
            Some(&format!("It is blind-index column {typmod} (see the view blind_index_columns).")),
            None,
        )
    }
    if store::in_inheritance_tree(relid) {
        errors::raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("cannot register a column of {}: it is part of an inheritance or partition tree", table.name),
            Some("A registered column's type changes to encrypted_text(<id>), which PostgreSQL changes for a whole inheritance tree at once."),
            Some("Register columns of tables outside inheritance and partitioning."),
        )
    }
    let id = store::next_blind_index_id();
    let quoted = CStr::from_ptr(pg_sys::quote_identifier(column.as_ptr())).to_string_lossy().into_owned();
    store::insert_blind_index_column(id, norm.name(), &table.name, &column.to_string_lossy());
    // Under the table's ACCESS EXCLUSIVE lock: this function binds each value it reads from the
    // column itself (nothing the owner's code does meanwhile can have a value of its choosing
    // bound), then the column's type becomes encrypted_text(<id>), as the owner. That rewrite
    // keeps only the live, bound row versions, so no index ever meets an unbound one, and from
    // then on every value stored in the column is bound on its way in (types.rs).
    let bound = store::with_stable_names(&mut table, true, |table| {
        let bound = bind_existing(table, &quoted, id, typid);
        let alter = format!("ALTER TABLE {} ALTER COLUMN {quoted} TYPE {}.encrypted_text({id})", table.name, store::extension_schema());
        store::as_table_owner(table, || Spi::run(&alter))
            .unwrap_or_else(|e| errors::raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("could not register the column: {e}"), None, None));
        bound
    })
    .expect("waits for the lock");
    crate::audit::record(&crate::audit::Event {
        action: "register blind index",
        outcome: "started",
        key_version: None,
        fingerprint: None,
        detail: &format!("{}.{} as blind-index column {id} ({}), {bound} values bound", table.name, column.to_string_lossy(), norm.name()),
    });
    // On a Citus coordinator, the workers get the registration in this transaction (their
    // shards compute blind indexes under the same id).
    crate::citus::share_keyring();
    let message = format!(
        "registered: {}.{quoted} is blind-index column {id} ({}); {bound} values bound. Index it with CREATE INDEX ON {} (blind_index({quoted}));",
        table.name,
        norm.name(),
        table.name
    );
    pgrx::IntoDatum::into_datum(message).unwrap_or(Datum::from(0))
});

/// Binds every value of a column being registered: read from the table as its owner (with
/// row_security off, so every row), bound here, and written back to the same row.
fn bind_existing(table: &store::UserTable, column: &str, id: u32, typid: pg_sys::Oid) -> i64 {
    let select = format!("SELECT ctid::pg_catalog.text, {column} FROM ONLY {} WHERE {column} IS NOT NULL", table.name);
    let update = format!("UPDATE ONLY {} SET {column} = $1 WHERE ctid OPERATOR(pg_catalog.=) $2::pg_catalog.tid", table.name);
    // Whoever registers a column that holds values vouches for them: a value someone copied in
    // from another column would get a blind index too. So that takes the right to decrypt.
    let may_bind = crate::roles::current_user_has(crate::roles::READER);
    store::as_table_owner(table, || {
        Spi::connect_mut(|c| {
            let mut rows = Vec::new();
            let mut t = c.select(&select, None, &[])?;
            if !may_bind && !t.is_empty() {
                errors::raise(
                    PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                    format!("permission denied to register a column that holds values: {} already has some", table.name),
                    Some("Registering binds every value the column holds to its blind index; a value copied into it from another column would get one too, so this takes the right to decrypt."),
                    Some("Register the column while it is empty, or have a member of data_encryption_reader (also a member of data_encryption_admin) register it."),
                )
            }
            while t.next().is_some() {
                let ctid = t.get::<String>(1)?.unwrap_or_default();
                if let Some(d) = t.get_datum_by_ordinal(2)? {
                    // SAFETY: a non-null encrypted_text datum of the row just read.
                    rows.push((ctid, unsafe { types::rebind(d, id) }));
                }
            }
            for (ctid, d) in &rows {
                // SAFETY: `d` is an encrypted_text datum, palloc'd in this SPI connection.
                c.update(&update, None, &[unsafe { pgrx::datum::DatumWithOid::new(*d, typid) }, ctid.as_str().into()])?;
            }
            Ok::<_, pgrx::spi::Error>(rows.len() as i64)
        })
    })
    .unwrap_or_else(|e| errors::raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("could not bind the column's values: {e}"), None, None))
}

/// `rotate_blind_index_key() returns text`: replaces the blind-index key with a fresh random
/// one and rebuilds every index that uses `blind_index`, in one transaction (so no lookup ever
/// mixes keys), with a NOTICE per index. Administrators only, over a secure connection; one
/// rotation at a time (55P03).
#[pg_extern(volatile, parallel_unsafe)]
fn rotate_blind_index_key() -> String {
    const F: &str = "rotate_blind_index_key()";
    policy::require_admin(F);
    policy::require_primary(F);
    policy::require_secure_transport(F, F);
    crate::citus::refuse_single_node_key_change(F);
    policy::lock_or_refuse(policy::Lock::IndexKeyRotation, F);
    refuse_generated_columns();
    let loaded = keys::loaded();
    let old_version = loaded.index_key.as_ref().map(|(v, _)| *v).unwrap_or(0);
    let new_version = old_version + 1;
    let new_key = SecretKey::random();
    store::retire_index_key();
    key_admin::store_index_key(new_version, &loaded.wrap, loaded.current_version, &new_key, true);
    // This transaction computes with the new key from here on; others at its commit.
    let rebuilt = {
        let copy = |k: &SecretKey| SecretKey::from_bytes(*k.expose());
        let data = loaded.data_keys.iter().find(|(v, _)| *v == loaded.current_version).map(|(_, k)| copy(k)).expect("the current data key is loaded");
        let others: Vec<(u32, SecretKey)> = loaded.data_keys.iter().filter(|(v, _)| *v != loaded.current_version).map(|(v, k)| (*v, copy(k))).collect();
        crate::keystate::install_keys(keys::LoadedKeys::build(
            keys::keyring_relid(),
            keys::generation_now(),
            loaded.current_version,
            data,
            copy(&loaded.wrap),
            others,
            Some((new_version, new_key)),
        ));
        drop(loaded);
        crate::keystate::announce_at_commit();
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
const BLIND_INDEX_FUNCTIONS: &str = "SELECT p.oid FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_depend e ON e.objid OPERATOR(pg_catalog.=) p.oid \
     JOIN pg_catalog.pg_extension x ON x.oid OPERATOR(pg_catalog.=) e.refobjid \
     WHERE x.extname OPERATOR(pg_catalog.=) 'pg_cellcrypt' AND p.proname OPERATOR(pg_catalog.=) 'blind_index' \
       AND e.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass \
       AND e.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_extension'::pg_catalog.regclass AND e.deptype OPERATOR(pg_catalog.=) 'e'";

/// A rotation rebuilds indexes; a stored generated column (or a default) computed with
/// `blind_index` would keep hashes under the old key and silently stop matching, so the
/// rotation is refused. The expression's dependency on the function is recorded for its
/// pg_attrdef entry, or on PostgreSQL 14 for a generated column, for the column itself.
fn refuse_generated_columns() {
    let columns: Option<String> = store::as_extension_owner(|| {
        Spi::get_one::<String>(&format!(
            "SELECT pg_catalog.string_agg(pg_catalog.format('%s.%I', t.attrelid::pg_catalog.regclass, t.attname), ', ' ORDER BY t.attrelid, t.attnum) \
             FROM (SELECT a.adrelid AS relid, a.adnum AS attnum FROM pg_catalog.pg_depend d \
                     JOIN pg_catalog.pg_attrdef a ON a.oid OPERATOR(pg_catalog.=) d.objid \
                    WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_attrdef'::pg_catalog.regclass \
                      AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass \
                      AND d.refobjid OPERATOR(pg_catalog.=) ANY ({BLIND_INDEX_FUNCTIONS}) \
                   UNION \
                   SELECT d.objid, d.objsubid::pg_catalog.int2 FROM pg_catalog.pg_depend d \
                    WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass \
                      AND d.objsubid OPERATOR(pg_catalog.>) 0 \
                      AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass \
                      AND d.refobjid OPERATOR(pg_catalog.=) ANY ({BLIND_INDEX_FUNCTIONS})) c \
             JOIN pg_catalog.pg_attribute t ON t.attrelid OPERATOR(pg_catalog.=) c.relid AND t.attnum OPERATOR(pg_catalog.=) c.attnum"
        ))
        // A check that cannot run refuses (an error here must not let the rotation through).
        .unwrap_or_else(|e| pgrx::error!("pg_cellcrypt: cannot check for stored blind indexes: {e}"))
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
    // Indexes with storage only (a partitioned index is rebuilt through its partitions' own).
    // Another session's temporary table cannot be reindexed from here: it is left, with a
    // warning, rather than letting any session that can create a temporary table block the
    // rotation.
    let indexes: Vec<(String, bool)> = store::as_extension_owner(|| {
        Spi::connect(|c| {
            let t = c.select(
                format!(
                    "SELECT DISTINCT d.objid::pg_catalog.regclass::pg_catalog.text, \
                            i.relpersistence OPERATOR(pg_catalog.=) 't' AND i.relnamespace OPERATOR(pg_catalog.<>) pg_catalog.pg_my_temp_schema() \
                 FROM pg_catalog.pg_depend d \
                 JOIN pg_catalog.pg_class i ON i.oid OPERATOR(pg_catalog.=) d.objid AND i.relkind OPERATOR(pg_catalog.=) 'i' \
                 WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass \
                   AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass \
                   AND d.refobjid OPERATOR(pg_catalog.=) ANY ({BLIND_INDEX_FUNCTIONS}) \
                 ORDER BY 1"
                )
                .as_str(),
                None,
                &[],
            )?;
            let mut out = Vec::new();
            for r in t {
                out.push((r.get::<String>(1)?.unwrap_or_default(), r.get::<bool>(2)?.unwrap_or(false)));
            }
            Ok::<_, pgrx::spi::Error>(out)
        })
        .unwrap_or_else(|e| errors::raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("could not list blind indexes: {e}"), None, None))
    });
    let (others, mine): (Vec<_>, Vec<_>) = indexes.into_iter().partition(|(_, other_session)| *other_session);
    for (index, _) in &others {
        pgrx::warning!(
            "pg_cellcrypt: blind index {index} is on another session's temporary table and was not rebuilt; lookups through it in that session miss values until it runs REINDEX"
        );
    }
    let total = mine.len();
    for (i, (index, _)) in mine.iter().enumerate() {
        store::as_extension_owner(|| Spi::run(&format!("REINDEX INDEX {index}")))
            .unwrap_or_else(|e| errors::raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("could not rebuild index {index}: {e}"), None, None));
        pgrx::notice!("pg_cellcrypt: rebuilt blind index {} ({} of {total})", index, i + 1);
    }
    total as i64
}

pgrx::extension_sql!(
    r#"
-- Blind indexes (blind_index.rs): opt-in per column. An administrator registers a column; its
-- values are bound to it (types.rs) and hashed under a key of its own.
CREATE TABLE cellcrypt.blind_index_column (
    id            integer PRIMARY KEY CHECK (id OPERATOR(pg_catalog.>=) 1 AND id OPERATOR(pg_catalog.<=) 65535),
    normalization text NOT NULL,
    table_name    text NOT NULL,
    column_name   text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT pg_catalog.now(),
    created_by    name NOT NULL DEFAULT session_user
);
-- Ids come from a sequence, never reused (a registration rolled back leaves its id unused).
CREATE SEQUENCE cellcrypt.blind_index_column_id MINVALUE 1 MAXVALUE 65535 NO CYCLE;
SELECT pg_catalog.pg_extension_config_dump('cellcrypt.blind_index_column_id', '');
COMMENT ON TABLE cellcrypt.blind_index_column IS 'Columns registered for a blind index; a registered column is declared encrypted_text(<id>)';
SELECT pg_catalog.pg_extension_config_dump('cellcrypt.blind_index_column', '');
CREATE VIEW @extschema@.blind_index_columns AS
    SELECT id, table_name, column_name, normalization, created_at, created_by FROM cellcrypt.blind_index_column;
COMMENT ON VIEW @extschema@.blind_index_columns IS 'Columns registered for a blind index (as they were named when registered)';
GRANT SELECT ON @extschema@.blind_index_columns TO PUBLIC;

CREATE FUNCTION @extschema@.register_blind_index(table_name regclass, column_name name, normalization text DEFAULT 'exact') RETURNS text
    AS 'MODULE_PATHNAME', 'cellcrypt_register_blind_index' LANGUAGE c VOLATILE STRICT PARALLEL UNSAFE;
COMMENT ON FUNCTION @extschema@.register_blind_index(regclass, name, text) IS 'Registers an encrypted_text column for a blind index (administrators only)';
CREATE FUNCTION @extschema@.blind_index(@extschema@.encrypted_text) RETURNS bytea
    AS 'MODULE_PATHNAME', 'cellcrypt_blind_index_encrypted' LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION @extschema@.blind_index(value text, table_name regclass, column_name name) RETURNS bytea
    AS 'MODULE_PATHNAME', 'cellcrypt_blind_index_lookup' LANGUAGE c STABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION @extschema@.blind_index(@extschema@.encrypted_text) IS 'Blind index of a value of a registered column: HMAC-SHA256 under the column''s key, 16 bytes; reveals equality';
COMMENT ON FUNCTION @extschema@.blind_index(text, regclass, name) IS 'Blind index a value would have in a registered column, to look it up';
"#,
    name = "blind_index",
    requires = ["types"]
);

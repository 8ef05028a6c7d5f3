//! pg_cellcrypt: cell-level encryption for PostgreSQL.
//!
//! | file | concern |
//! |---|---|
//! | `core/` (crate `cellcrypt-core`) | the crypto core, free of PostgreSQL |
//! | [`gucs`] | every setting, in one place |
//! | [`errors`] | how errors are raised: SQLSTATE, message, detail, hint |
//! | [`keys`] | the data encryption key: what the database stores, how a backend loads and caches it |
//! | [`keystate`] | the transactional key state: what each (sub)transaction staged, merged or discarded as it ends |
//! | [`key_cache`] | shared memory: each database's current key, and the generation that announces a change |
//! | [`providers`] | where keys live: the `file`, `command` and `none` key providers |
//! | [`store`] | the extension's own tables, and every statement run with rights other than the caller's |
//! | [`policy`] | who may call what (roles, secure transport, primary only) and the extension's locks |
//! | [`key_admin`] | the administrator's SQL functions: set/change/restore/retrieve/status |
//! | [`reencrypt`] | moving every value under the current key, in batches; retiring old keys |
//! | [`worker`] | the launcher and the per-database re-encryption workers |
//! | [`fault`] | crash points for the no-loss tests (feature `fault_injection` only) |
//! | [`audit`] | the audit record of key operations |
//! | [`types`] | the encrypted column types: I/O, casts, `decrypt` |
//! | [`blind_index`] | blind indexes: `blind_index()`, index key rotation |
//! | [`backend_local`] | per-backend state without thread-local storage (hot paths) |
//! | [`roles`] | the roles the extension creates (and those it refuses to adopt); the membership check |
//! | [`hooks`] | `emit_log_hook`: keeps key material out of the server log |

use pgrx::prelude::*;

pub mod errors;
pub mod fault;
pub mod gucs;
pub mod hooks;
pub mod audit;
pub mod backend_local;
pub mod blind_index;
pub mod citus;
pub mod key_admin;
pub mod key_cache;
pub mod keys;
pub mod keystate;
pub mod policy;
pub mod providers;
pub mod reencrypt;
pub mod worker;
pub mod roles;
pub mod store;
pub mod types;

::pgrx::pg_module_magic!(name, version);

// The extension's own schema for internal state, created first.
pgrx::extension_sql!(
    r#"
CREATE SCHEMA cellcrypt;
COMMENT ON SCHEMA cellcrypt IS 'pg_cellcrypt internal state; not for direct use';
REVOKE ALL ON SCHEMA cellcrypt FROM PUBLIC;
-- USAGE only, so that names in it resolve: re-encryption runs as each table's owner and calls
-- cellcrypt.reencrypt(). Its tables are not readable by PUBLIC; its functions refuse those who
-- may not call them.
GRANT USAGE ON SCHEMA cellcrypt TO PUBLIC;
"#,
    name = "schema",
    bootstrap
);

/// Runs when the library is loaded. pg_cellcrypt must be loaded at server start: its settings,
/// hooks and per-process key state rely on it, so loading it any other way is refused.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: reading a backend global set by the postmaster.
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    if !preloading {
        errors::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "pg_cellcrypt must be loaded via shared_preload_libraries",
            Some("The library was loaded on demand, but it installs hooks and settings at server start."),
            Some("Add pg_cellcrypt to shared_preload_libraries in postgresql.conf, e.g. shared_preload_libraries = 'pg_cellcrypt', and restart the server."),
        );
    }
    // The crypto's known-answer tests, and in a FIPS build the module's FIPS mode (its power-on
    // self-tests and integrity check): the library refuses to load when one fails, so the server
    // does not start with it.
    if let Err(e) = cellcrypt_core::fips::self_test(fault::broken_self_test().as_deref()) {
        errors::raise(
            PgSqlErrorCode::ERRCODE_SYSTEM_ERROR,
            format!("pg_cellcrypt refuses to load: {e}"),
            Some(&format!("Crypto module: {}.", cellcrypt_core::fips::module())),
            Some("The crypto library failed its known-answer tests; nothing was encrypted or decrypted. Reinstall pg_cellcrypt from a trusted build, and report this if it persists."),
        );
    }
    // No message carries a Rust backtrace (pgrx attaches one to an error's DETAIL whenever the
    // environment asks Rust for backtraces): they would show the extension's internals to
    // clients. Set before any backtrace is taken, in the postmaster, so every backend inherits it.
    std::env::set_var("RUST_LIB_BACKTRACE", "0");
    gucs::init();
    key_cache::init();
    audit::init();
    hooks::init();
    key_admin::init();
    worker::init();
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    include!("tests.rs");
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            // Key derivation at the default, which is also the floor (19 MiB, 2 passes).
            "shared_preload_libraries = 'pg_cellcrypt'",
        ]
    }
}

//! Every pg_cellcrypt setting, in one place.
//!
//! | setting | context | default | meaning |
//! |---|---|---|---|
//! | `pg_cellcrypt.key_directory` | sighup | `<data_directory>/../pg_cellcrypt_keys` | where the `file` key provider keeps one key file per database. It must lie outside the data directory so base backups and replicas built from them do not carry the key. |
//! | `pg_cellcrypt.key_provider` | sighup | `file` | where each database's key lives: `file`, `command` or `none` (see `providers.rs`) |
//! | `pg_cellcrypt.key_command` | sighup | empty | for the `command` provider: a shell command that prints the database's key |
//! | `pg_cellcrypt.reencrypt_batch_size` | superuser | 1000 | rows per re-encryption batch (one short transaction each) |
//! | `pg_cellcrypt.reencrypt_pause` | superuser | 10 ms | pause between re-encryption batches, to protect production load |
//! | `pg_cellcrypt.kdf_memory_kib` | superuser | 19456 | Argon2id memory cost for new key versions |
//! | `pg_cellcrypt.kdf_iterations` | superuser | 2 | Argon2id passes for new key versions |
//! | `pg_cellcrypt.require_secure_transport` | superuser | on | key calls refuse TCP connections without SSL (SSL and Unix sockets are allowed) |
//! | `pg_cellcrypt.change_with_lost_key` | superuser | off | lets a key change go on when the key file no longer holds the (verified) key it replaces; otherwise it is refused, and setting the current key again writes it back |
//! | `pg_cellcrypt.redact_all_log_literals` | superuser | off | mask the string constants of every statement's log lines, not only of key calls, and leave out the raw STATEMENT line of errors: for roles that call key functions through wrappers of their own (`ALTER ROLE ... SET`) |
//!
//! The KDF settings apply when a key version is created; each version stores the parameters it
//! was derived with, so changing them never makes an existing key unverifiable.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};
use std::ffi::CString;

pub static KEY_DIRECTORY: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Where the database keys live.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum KeyProvider {
    #[name = c"file"]
    File,
    #[name = c"command"]
    Command,
    #[name = c"none"]
    None,
}

pub static KEY_PROVIDER: GucSetting<KeyProvider> = GucSetting::<KeyProvider>::new(KeyProvider::File);
pub static KEY_COMMAND: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static REENCRYPT_BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static REENCRYPT_PAUSE_MS: GucSetting<i32> = GucSetting::<i32>::new(10);
pub static KEY_COMMAND_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(30);
pub static AUDIT_MAX_SIZE_KB: GucSetting<i32> = GucSetting::<i32>::new(10 * 1024);
pub static KDF_MEMORY_KIB: GucSetting<i32> = GucSetting::<i32>::new(19 * 1024);
pub static KDF_ITERATIONS: GucSetting<i32> = GucSetting::<i32>::new(2);
pub static REQUIRE_SECURE_TRANSPORT: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static REDACT_ALL_LOG_LITERALS: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static CHANGE_WITH_LOST_KEY: GucSetting<bool> = GucSetting::<bool>::new(false);

pub fn init() {
    GucRegistry::define_string_guc(
        c"pg_cellcrypt.key_directory",
        c"Directory of the file key provider (one key file per database).",
        c"Must be outside the data directory. Empty means <data_directory>/../pg_cellcrypt_keys.",
        &KEY_DIRECTORY,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_enum_guc(
        c"pg_cellcrypt.key_provider",
        c"Where each database's data encryption key lives: file, command or none.",
        c"file: a key file per database in pg_cellcrypt.key_directory. command: pg_cellcrypt.key_command prints the key. none: shared memory only; restore the key after every restart.",
        &KEY_PROVIDER,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"pg_cellcrypt.key_command",
        c"Shell command that prints a database's key, for the command key provider.",
        c"Run with sh -c; PG_CELLCRYPT_DATABASE, PG_CELLCRYPT_DATABASE_OID and PG_CELLCRYPT_SYSTEM_IDENTIFIER say which key is wanted.",
        &KEY_COMMAND,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_int_guc(
        c"pg_cellcrypt.audit_max_size",
        c"Size at which a database's audit record file is closed and a new one started.",
        c"The closed file is renamed <name>.audit.<time> and kept; nothing is ever rewritten or deleted.",
        &AUDIT_MAX_SIZE_KB,
        64,
        1024 * 1024,
        GucContext::Sighup,
        GucFlags::UNIT_KB | GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_int_guc(
        c"pg_cellcrypt.key_command_timeout",
        c"How long pg_cellcrypt.key_command may run, in seconds, before it is killed.",
        c"A query cancel or terminate stops it at once too.",
        &KEY_COMMAND_TIMEOUT,
        1,
        3600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_cellcrypt.reencrypt_batch_size",
        c"Rows per re-encryption batch after a key change.",
        c"Each batch is one short transaction of the background worker or of finish_data_encryption_reencryption().",
        &REENCRYPT_BATCH_SIZE,
        1,
        1_000_000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_cellcrypt.reencrypt_pause",
        c"Pause between re-encryption batches of the background worker.",
        c"Raise it to leave more room to production load while a key change re-encrypts.",
        &REENCRYPT_PAUSE_MS,
        0,
        60_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_cellcrypt.kdf_memory_kib",
        c"Argon2id memory cost, in KiB, for new key versions of a passphrase.",
        c"Each key version stores the parameters it was derived with.",
        &KDF_MEMORY_KIB,
        cellcrypt_core::kdf::KDF_FLOOR.m_cost_kib as i32,
        4 * 1024 * 1024,
        GucContext::Suset,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_bool_guc(
        c"pg_cellcrypt.change_with_lost_key",
        c"Lets a key change go on when the key file no longer holds the key it replaces.",
        c"For a key file lost or overwritten while the server ran, when no copy of the current key is left: the change re-encrypts everything under the new key from the keys in memory. Backups from before it stay unreadable without the lost key.",
        &CHANGE_WITH_LOST_KEY,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_cellcrypt.redact_all_log_literals",
        c"Masks the string constants in the log lines of every statement, not only of key calls.",
        c"A wrapper function of your own that calls set_data_encryption_key is logged by log_statement before it runs, and nothing in its text names a key function. Set this for the roles that call such wrappers (ALTER ROLE ... SET).",
        &REDACT_ALL_LOG_LITERALS,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_cellcrypt.require_secure_transport",
        c"Key calls refuse TCP connections without SSL.",
        c"SSL and Unix-socket connections are always allowed. Turn off only where the network path is protected otherwise (an SSH tunnel, a TLS-terminating proxy on the same host, IPsec).",
        &REQUIRE_SECURE_TRANSPORT,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_cellcrypt.kdf_iterations",
        c"Argon2id passes for new key versions of a passphrase.",
        c"Each key version stores the parameters it was derived with.",
        &KDF_ITERATIONS,
        cellcrypt_core::kdf::KDF_FLOOR.t_cost as i32,
        64,
        GucContext::Suset,
        GucFlags::default(),
    );
}

/// The key directory in effect.
pub fn key_directory() -> std::path::PathBuf {
    match KEY_DIRECTORY.get() {
        // A relative setting is relative to the data directory (every backend's working
        // directory): made absolute, so that what is recorded of it means the same elsewhere.
        Some(s) if !s.as_bytes().is_empty() => {
            let p = std::path::PathBuf::from(s.to_string_lossy().into_owned());
            if p.is_absolute() {
                p
            } else {
                // SAFETY: DataDir is set before any backend code runs.
                let data_dir = unsafe { std::ffi::CStr::from_ptr(pgrx::pg_sys::DataDir) };
                std::path::PathBuf::from(data_dir.to_string_lossy().into_owned()).join(p)
            }
        }
        _ => {
            // SAFETY: DataDir is set before any backend code runs.
            let data_dir = unsafe { std::ffi::CStr::from_ptr(pgrx::pg_sys::DataDir) };
            let data_dir = std::path::PathBuf::from(data_dir.to_string_lossy().into_owned());
            let abs = std::fs::canonicalize(&data_dir).unwrap_or(data_dir);
            abs.parent().map(|p| p.to_path_buf()).unwrap_or(abs).join("pg_cellcrypt_keys")
        }
    }
}

/// The key command, when one is set.
pub fn key_command() -> Option<String> {
    KEY_COMMAND.get().map(|s| s.to_string_lossy().into_owned()).filter(|s| !s.trim().is_empty())
}

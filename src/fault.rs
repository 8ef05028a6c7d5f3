//! Crash points, for the no-loss suite's "a crash between each step of a change".
//!
//! Built only with the cargo feature `fault_injection` (what `make install-dev`, the build the
//! integration tests run, installs; `make install` and packages never have it), in the manner of
//! PostgreSQL's own `--enable-injection-points`. A test writes a point's name into
//! `<data_directory>/pg_cellcrypt.crash`; the first process that reaches that point removes the
//! file, logs `pg_cellcrypt: crash point <name>` and kills itself with SIGKILL. The postmaster
//! then treats it as a crash: every process is stopped, shared memory (the key cache with it)
//! is reset, and the server recovers from WAL, as after a power cut for what was committed.
//!
//! | point | where |
//! |---|---|
//! | `create:key_file_written` | `CREATE EXTENSION`: the key file holds the first key, nothing committed |
//! | `change:key_file_written` | a key change: the key file holds the new version, the keyring change not committed |
//! | `restore:key_file_written` | a key restore: the key file holds the restored key, nothing committed |
//! | `commit:before_effects` | any key call: committed, before the shared cache, other sessions and the worker hear of it |
//! | `reencrypt:batch_done` | a re-encryption batch rewrote its rows, before it commits |
//! | `reencrypt:retired` | the older keys are retired, before that commits |
//! | `cluster:before_commit_prepared` | a server with Citus loaded: any `COMMIT PREPARED` arrived, before it runs (the Citus test arms it on a worker just before a cluster key change, whose part is then prepared and the coordinator committed) |

#[cfg(feature = "fault_injection")]
pub fn point(name: &str) {
    // SAFETY: DataDir is set before any backend code runs.
    let dir = unsafe { std::ffi::CStr::from_ptr(pgrx::pg_sys::DataDir) }.to_string_lossy().into_owned();
    let file = std::path::Path::new(&dir).join("pg_cellcrypt.crash");
    match std::fs::read_to_string(&file) {
        Ok(wanted) if wanted.trim() == name => {
            let _ = std::fs::remove_file(&file);
            pgrx::log!("pg_cellcrypt: crash point {name}");
            // SAFETY: ends this process, as a crash would.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        _ => {}
    }
}

#[cfg(not(feature = "fault_injection"))]
#[inline(always)]
pub fn point(_name: &str) {}

/// The self-test to fail on purpose at the next start (fault-injection builds only): the name
/// in `<data_directory>/pg_cellcrypt.break_self_test`, e.g. `AES-256-GCM`. The file stays (the
/// test removes it), so every start fails while it is there.
#[cfg(feature = "fault_injection")]
pub fn broken_self_test() -> Option<String> {
    // SAFETY: DataDir is set before shared_preload_libraries are loaded.
    let dir = unsafe { pgrx::pg_sys::DataDir };
    if dir.is_null() {
        return None;
    }
    let dir = unsafe { std::ffi::CStr::from_ptr(dir) }.to_string_lossy().into_owned();
    std::fs::read_to_string(std::path::Path::new(&dir).join("pg_cellcrypt.break_self_test")).ok().map(|s| s.trim().to_owned())
}

#[cfg(not(feature = "fault_injection"))]
#[inline(always)]
pub fn broken_self_test() -> Option<String> {
    None
}

//! Citus: one key identity for a coordinator and its workers.
//!
//! pg_cellcrypt does not link Citus. When `citus` is in `shared_preload_libraries` (before
//! pg_cellcrypt), PostgreSQL has loaded it with `RTLD_GLOBAL`, and the few functions used here
//! are found by name at run time (`dlsym`): without Citus they are absent and every function
//! below says "no Citus". They exist, with these signatures, in Citus 13.x and 14.x.
//!
//! What it does (README, "Scaling out with Citus"):
//! * **A worker never makes a key of its own.** When Citus creates the extension on a worker (it
//!   propagates `CREATE EXTENSION` from the coordinator, and replays it on a node
//!   `citus_add_node` adds), the worker's keyring stays empty: it waits for the cluster's.
//! * **The coordinator shares its keyring** in the same distributed transaction (Citus' two-phase
//!   commit: every worker or none): right after `CREATE EXTENSION pg_cellcrypt`, on
//!   `register_blind_index`, and on `SELECT share_data_encryption_keyring()` (after
//!   `citus_add_node`). A worker takes it only into an empty keyring, or finds it identical;
//!   anything else is refused. The rows carry no key: each node reads the key itself from its
//!   own provider (the key command against the same KMS, or a copy of the key file) and checks
//!   it against the shared fingerprint, so an envelope sealed on any node opens on every node of
//!   the cluster, and on no other database.
//! * **A key change on the coordinator changes the key on every node**, in its distributed
//!   transaction: all nodes or none ([`change_on_workers`]). A node that is down makes it
//!   refuse up front. A worker takes only its own keyring plus one new version, with every data
//!   key and the blind-index key intact. Each node re-encrypts its own shards with its own
//!   background worker; a worker applies what its prepared transaction committed when `COMMIT
//!   PREPARED` runs (`hooks.rs`), since the commit callbacks of a key change do not run for a
//!   prepared one. Older versions are kept, never retired, on a Citus node
//!   (`store::keep_previous_keys`): values move between nodes, so no node can know alone that
//!   no value needs them.
//! * **A key change on a worker, and blind-index key rotations anywhere, are refused** (0A000):
//!   a change on one node alone would leave the others unable to open what it writes. (A
//!   restore, which changes nothing, is allowed on every node.)

use crate::errors;
use pgrx::{pg_sys, PgSqlErrorCode};
use std::ffi::{c_char, CStr};

type BoolFn = unsafe extern "C-unwind" fn() -> bool;
type SendFn = unsafe extern "C-unwind" fn(*const c_char);

fn symbol(name: &CStr) -> Option<*mut libc::c_void> {
    // SAFETY: dlsym on the global namespace of this process, which PostgreSQL's loader fills
    // (RTLD_GLOBAL); a missing symbol is a null pointer.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    (!p.is_null()).then_some(p)
}

fn call_bool(name: &CStr) -> Option<bool> {
    let f = symbol(name)?;
    // SAFETY: the Citus functions named here take no arguments and return a C bool; Citus'
    // ereports become Rust panics at the boundary (pgrx), never a longjmp across Rust frames.
    Some(unsafe {
        let f: BoolFn = std::mem::transmute::<*mut libc::c_void, BoolFn>(f);
        pg_sys::ffi::pg_guard_ffi_boundary(|| f())
    })
}

/// True when Citus is loaded in this server (in `shared_preload_libraries`, so in the
/// postmaster already: the answer is looked up once per process).
pub fn loaded() -> bool {
    static LOADED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LOADED.get_or_init(|| symbol(c"IsCitusInternalBackend").is_some())
}

/// True in a backend Citus opened from another node (the coordinator propagating DDL, a
/// distributed transaction's connection, the rebalancer, metadata sync).
pub fn internal_backend() -> bool {
    call_bool(c"IsCitusInternalBackend").unwrap_or(false)
}

/// True when the `citus` extension exists in this database (Citus' metadata tables with it).
pub fn citus_in_database() -> bool {
    // SAFETY: a catalog lookup by name; missing_ok.
    loaded() && unsafe { pg_sys::get_extension_oid(c"citus".as_ptr(), true) } != pg_sys::InvalidOid
}

/// This database's place in a Citus cluster.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    /// No Citus, or a Citus database with no other node.
    Alone,
    /// The coordinator of a cluster with workers.
    Coordinator,
    /// A worker of a cluster (its group id is not the coordinator's).
    Worker,
}

/// This database's place in a Citus cluster, from Citus' own metadata (`pg_dist_node`,
/// `pg_dist_local_group`), read as the extension's owner with the pinned search_path.
pub fn role() -> Role {
    if !citus_in_database() {
        return Role::Alone;
    }
    crate::store::citus_role().unwrap_or(Role::Alone)
}

/// Sends `command` to every worker with metadata, in this transaction, over Citus' connections
/// as the current user if a superuser, else as the Citus extension's owner (a superuser): Citus
/// commits it there with two-phase commit when this transaction commits, or rolls it back
/// everywhere. Raises if a worker cannot be reached. The worker's entry points accept
/// superusers only, so an administrator of a worker (not a superuser) cannot call them
/// directly; the coordinator has checked its own caller.
pub fn send_to_workers(command: &CStr) {
    // A superuser's own connections, which see what this transaction did before on the workers
    // (the extension Citus created there a moment ago, in CREATE EXTENSION by a superuser who
    // does not own citus); anyone else's (an administrator's key change) go over the Citus
    // extension owner's, since the workers' entry points accept superusers only.
    // SAFETY: a plain backend check of the current user.
    let name = if unsafe { pg_sys::superuser() } { c"SendCommandToWorkersWithMetadata" } else { c"SendCommandToWorkersWithMetadataViaSuperUser" };
    let Some(f) = symbol(name) else {
        errors::raise(PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED, "Citus is not loaded in this server", None, None)
    };
    // SAFETY: both functions take (const char *) and copy the command; their errors
    // are caught at the boundary and re-raised as PostgreSQL errors by pgrx.
    unsafe {
        let f: SendFn = std::mem::transmute::<*mut libc::c_void, SendFn>(f);
        pg_sys::ffi::pg_guard_ffi_boundary(|| f(command.as_ptr()));
    }
}

/// `SELECT function('a'::text, 'b'::text, 'c'::text)` on every worker, in this transaction
/// ([`send_to_workers`]). The command text is zeroized after use: an argument may be a key.
fn call_on_workers(function: &str, args: [&str; 3]) {
    // Sized up front (with its NUL), and passed on as it is, so that no reallocation or C copy
    // leaves a copy of a key behind unzeroized.
    let capacity = function.len() + args.iter().map(|a| 2 * a.len() + 24).sum::<usize>() + 17;
    let mut command = zeroize::Zeroizing::new(String::with_capacity(capacity));
    let buffer = command.as_ptr();
    command.push_str("SELECT ");
    command.push_str(function);
    command.push('(');
    // E'' literals, quotes and backslashes doubled: read the same whatever a worker's
    // standard_conforming_strings (the keyring's JSON carries backslashes: bytea as "\\x..").
    for (i, arg) in args.iter().enumerate() {
        command.push_str(if i == 0 { "E'" } else { ", E'" });
        for c in arg.chars() {
            command.push(c);
            if c == '\'' || c == '\\' {
                command.push(c);
            }
        }
        command.push_str("'::pg_catalog.text");
    }
    command.push_str(")\0");
    debug_assert_eq!(command.as_ptr(), buffer, "the command was reallocated");
    send_to_workers(CStr::from_bytes_with_nul(command.as_bytes()).expect("text arguments hold no NUL"));
}

/// Shares this coordinator's key tables with every worker, in this transaction: each worker
/// takes them into an empty keyring, finds them identical, or refuses (and so does the whole
/// transaction). Does nothing outside a cluster with workers.
pub fn share_keyring() -> usize {
    if role() != Role::Coordinator {
        return 0;
    }
    let (keyring, index_key, columns) = crate::store::key_tables_as_json();
    call_on_workers("cellcrypt._adopt_cluster_keyring", [&keyring, &index_key, &columns]);
    crate::store::citus_worker_count()
}

/// Refuses (55000) a cluster-wide change up front while a worker is inactive or cannot be
/// reached: the change must reach every node or none.
pub fn require_all_workers_reachable(function: &str) {
    let down = crate::store::unreachable_workers();
    if down.is_empty() {
        return;
    }
    crate::policy::refuse(function, &format!("workers unreachable: {}", down.join(", ")));
    errors::raise(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("{function} needs every node of the Citus cluster; nothing was changed"),
        Some(&format!("The coordinator cannot reach {} (inactive, down or refusing connections).", down.join(", "))),
        Some("Bring the node back (or remove it with citus_remove_node after moving its shards away), then call it again: a key changes on every node in one distributed transaction, or on none."),
    )
}

/// Sends the coordinator's new keyring and the new key to every worker, in this transaction
/// (Citus' two-phase commit): each worker checks that it held the key being replaced, stores
/// the new one through its own key provider, takes the keyring and queues its own shards for
/// re-encryption. The key travels only over Citus' connections, which the worker requires to
/// use SSL (or a Unix socket); the command names `set_data_encryption_key`, so the worker masks
/// its text in its logs and `pg_stat_activity` as it masks any key call.
pub fn change_on_workers(key: &str) -> usize {
    let (keyring, index_key, _) = crate::store::key_tables_as_json();
    call_on_workers("cellcrypt._cluster_set_data_encryption_key", [&keyring, &index_key, key]);
    crate::store::citus_worker_count()
}

/// Refuses (0A000) an operation that would change keys on one node of a Citus cluster only.
pub fn refuse_single_node_key_change(function: &str) {
    let r = role();
    if r == Role::Alone {
        return;
    }
    crate::policy::refuse(function, "a node of a Citus cluster");
    errors::raise(
        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
        format!("{function} is not supported on a Citus cluster yet"),
        Some(&format!(
            "This database is the {} of a Citus cluster whose nodes share one keyring; a change made on one node alone would leave the others unable to open what it writes.",
            if r == Role::Coordinator { "coordinator" } else { "a worker" }
        )),
        Some("Keep the current key (README, \"Scaling out with Citus\"). A restore (set_data_encryption_key with the cluster's current key) is allowed on every node."),
    )
}

/// On a coordinator with workers: `query` (one text value) run on every worker by Citus'
/// `run_command_on_workers`, as the calling role, each in its own connection and transaction
/// (read-only reports). Returns (node, Ok(result) or Err(error)) per worker.
pub fn on_each_worker(query: &str) -> Vec<(String, Result<String, String>)> {
    if role() != Role::Coordinator {
        return Vec::new();
    }
    crate::store::run_on_workers(query)
}

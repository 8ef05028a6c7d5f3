//! The process-shared key cache: one slot per database, and a generation counter that tells
//! every backend when a key changed.
//!
//! * A slot holds the current key version of one database: its version and fingerprint (in
//!   PostgreSQL's shared memory, under the cache's LWLock) and the keys derived from it, the
//!   data key and the wrap key ([`VersionKeys`]), in a mapping of their own (see below).
//!   Backends take the keys from here instead of running the key provider and the key derivation again.
//!   Slots are overwritten (never freed to the allocator), so a replaced key does not linger.
//! * No slot holds the master key, and none holds the administrator's key text, except with
//!   the `none` provider, where the slot is the text's only copy (retrieval and restarts need
//!   it). With `file` and `command`, retrieval reads the text from the provider.
//! * [`generation`] is bumped after a key change commits. Every backend compares it with the
//!   generation it loaded its keys at on each key access (one atomic load), so from the commit
//!   on no session, and no parallel worker, seals with the old key.
//!
//! ## The key mapping
//! The secret part of the slots lives in an anonymous shared mapping the postmaster creates at
//! preload (every backend inherits it at fork): page-aligned, so it can be marked
//! `MADV_DONTDUMP` (no core dump of the postmaster or of any backend holds it) and locked in
//! memory with `mlock` (never written to swap) where `RLIMIT_MEMLOCK` allows; a refusal is
//! logged once at start. It is zeroed whenever PostgreSQL (re)initializes its shared memory,
//! after a crash too.
//!
//! There are [`SLOTS`] slots. The slots of dropped databases are reused. Beyond that many live
//! databases with the extension, keys are still loaded (from the `file` or `command` provider)
//! but not shared, and a key change with the `none` provider, which keeps the key nowhere else,
//! is refused before it commits.

use cellcrypt_core::kdf::FINGERPRINT_LEN;
use cellcrypt_core::{SecretKey, VersionKeys};
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, pg_sys, PGRXSharedMemory, PgAtomic, PgLwLock};
use std::sync::atomic::{AtomicU64, Ordering};
use zeroize::Zeroize;

pub const SLOTS: usize = 64;
/// The longest key text a slot holds (and so the longest key `set_data_encryption_key` takes).
pub const MAX_KEY_TEXT: usize = 256;

/// The public part of a slot, in PostgreSQL's shared memory.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Slot {
    used: bool,
    dboid: u32,
    version: u32,
    fingerprint: [u8; FINGERPRINT_LEN],
    failure: FailureRecord,
}

/// The last failed key load of a database, which the backends waiting for it take as theirs
/// (see `keys::current_version_keys`). Holds no secret: a kind, a version, two short texts
/// (fingerprints, a provider's message).
#[derive(Clone, Copy)]
#[repr(C)]
struct FailureRecord {
    /// Microseconds since the Unix epoch; 0: none.
    at_us: u64,
    generation: u64,
    stamp: u64,
    /// The key version (and its fingerprint) the load was for.
    version: u32,
    fingerprint: [u8; FINGERPRINT_LEN],
    failure: [u8; FAILURE_TEXT],
    failure_len: u16,
}

const FAILURE_TEXT: usize = 512;
const NO_FAILURE: FailureRecord =
    FailureRecord { at_us: 0, generation: 0, stamp: 0, version: 0, fingerprint: [0; FINGERPRINT_LEN], failure: [0; FAILURE_TEXT], failure_len: 0 };
const EMPTY: Slot = Slot { used: false, dboid: 0, version: 0, fingerprint: [0; FINGERPRINT_LEN], failure: NO_FAILURE };

fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// What a failed key load was: the key generation and provider stamp it ran under, and the
/// key version and fingerprint it was for. A failure answers only a load of the same.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct LoadOf {
    pub generation: u64,
    pub stamp: u64,
    pub version: u32,
    pub fingerprint: [u8; FINGERPRINT_LEN],
}

/// Records that loading this database's key failed (`failure`, an encoded error) for `of`.
/// Takes a slot if the database has none.
pub fn record_failure(of: LoadOf, failure: &str) {
    let dropped = dropped_databases();
    let dboid = my_dboid();
    let mut slots = CACHE.exclusive();
    let Some(i) = slot_for(&slots, dboid, &dropped) else { return };
    if !(slots.0[i].used && slots.0[i].dboid == dboid) {
        clear(&mut slots, i);
        slots.0[i].used = true;
        slots.0[i].dboid = dboid;
    }
    let mut bytes = failure.as_bytes();
    if bytes.len() > FAILURE_TEXT {
        let mut end = FAILURE_TEXT;
        while !failure.is_char_boundary(end) {
            end -= 1;
        }
        bytes = &bytes[..end];
    }
    let f = &mut slots.0[i].failure;
    *f = NO_FAILURE;
    f.at_us = now_us();
    f.generation = of.generation;
    f.stamp = of.stamp;
    f.version = of.version;
    f.fingerprint = of.fingerprint;
    f.failure[..bytes.len()].copy_from_slice(bytes);
    f.failure_len = bytes.len() as u16;
}

/// The failure recorded for this database less than `within` ago for the same load `of`, if
/// any. A clock that went backwards makes a record stale, never fresh for longer.
pub fn recent_failure(of: LoadOf, within: std::time::Duration) -> Option<String> {
    let dboid = my_dboid();
    let slots = CACHE.share();
    let f = &slots.0.iter().find(|s| s.used && s.dboid == dboid)?.failure;
    let now = now_us();
    let fresh = f.at_us != 0 && now >= f.at_us && now - f.at_us < within.as_micros() as u64;
    let same = LoadOf { generation: f.generation, stamp: f.stamp, version: f.version, fingerprint: f.fingerprint } == of;
    (fresh && same).then(|| String::from_utf8_lossy(&f.failure[..f.failure_len as usize]).into_owned())
}

/// The secret part of a slot, in the key mapping.
#[repr(C)]
struct Secret {
    data: [u8; 32],
    wrap: [u8; 32],
    key_len: u16,
    key_text: [u8; MAX_KEY_TEXT],
}

#[derive(Clone, Copy)]
#[repr(C)]
pub struct Slots([Slot; SLOTS]);

impl Default for Slots {
    fn default() -> Self {
        Slots([EMPTY; SLOTS])
    }
}

// SAFETY: plain old data, no pointers.
unsafe impl PGRXSharedMemory for Slots {}

/// The key version a database last announced after a `COMMIT PREPARED` (a Citus worker taking
/// a cluster key change), by database; see [`announce`]. Holds no secret.
#[derive(Clone, Copy)]
#[repr(C)]
struct Announced {
    dboid: u32,
    version: u32,
    fingerprint: [u8; FINGERPRINT_LEN],
}

#[repr(C)]
pub struct Announcements([Announced; SLOTS]);

impl Default for Announcements {
    fn default() -> Self {
        Announcements([Announced { dboid: 0, version: 0, fingerprint: [0; FINGERPRINT_LEN] }; SLOTS])
    }
}

// SAFETY: plain old data, no pointers.
unsafe impl PGRXSharedMemory for Announcements {}

static CACHE: PgLwLock<Slots> = unsafe { PgLwLock::new(c"pg_cellcrypt key cache") };
static ANNOUNCED: PgLwLock<Announcements> = unsafe { PgLwLock::new(c"pg_cellcrypt key announcements") };
static GENERATION: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"pg_cellcrypt key generation") };

/// The key mapping: `SLOTS` [`Secret`]s, created once in the postmaster and inherited by every
/// backend. Null only if it could not be created (then nothing is cached).
static mut SECRETS: *mut Secret = std::ptr::null_mut();
static mut PREV_SHMEM_STARTUP: pg_sys::shmem_startup_hook_type = None;

fn mapping_len() -> usize {
    // SAFETY: a plain libc query.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    (SLOTS * std::mem::size_of::<Secret>()).div_ceil(page) * page
}

/// Requests the shared memory and creates the key mapping; from `_PG_init`, in the postmaster.
pub fn init() {
    pg_shmem_init!(CACHE);
    pg_shmem_init!(GENERATION);
    pg_shmem_init!(ANNOUNCED);
    let len = mapping_len();
    // SAFETY: a fresh anonymous mapping owned by this library for the life of the server; the
    // hook is chained once, single-threaded, at preload.
    unsafe {
        let p = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0);
        if p == libc::MAP_FAILED {
            pgrx::log!("pg_cellcrypt: could not create the shared key mapping ({}); keys are not shared between sessions", std::io::Error::last_os_error());
            return;
        }
        if libc::madvise(p, len, libc::MADV_DONTDUMP) != 0 {
            pgrx::log!("pg_cellcrypt: could not exclude the shared key mapping from core dumps: {}", std::io::Error::last_os_error());
        }
        if libc::mlock(p, len) != 0 {
            pgrx::log!(
                "pg_cellcrypt: could not lock the shared key mapping in memory ({}); raise RLIMIT_MEMLOCK (LimitMEMLOCK) by {len} bytes, or use encrypted swap",
                std::io::Error::last_os_error()
            );
        }
        SECRETS = p.cast();
        PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(zero_at_shmem_startup);
    }
}

/// PostgreSQL (re)initialized its shared memory (at start, and after a backend crashed): the
/// slots are empty again, and so is the key mapping.
#[pg_guard]
unsafe extern "C-unwind" fn zero_at_shmem_startup() {
    // SAFETY: the previous hook, then the mapping this library created, whole.
    unsafe {
        if let Some(prev) = PREV_SHMEM_STARTUP {
            prev();
        }
        if !SECRETS.is_null() {
            std::slice::from_raw_parts_mut(SECRETS.cast::<u8>(), mapping_len()).zeroize();
        }
    }
}

/// The secret part of slot `i`. Callers hold the cache's LWLock (shared to read, exclusive to
/// write).
fn secret(i: usize) -> Option<&'static mut Secret> {
    // SAFETY: `SECRETS` points at `SLOTS` secrets for the life of the process; the LWLock the
    // caller holds orders every access to them.
    unsafe { (!SECRETS.is_null()).then(|| &mut *SECRETS.add(i)) }
}

/// The key-change generation: changes whenever any database's key changed.
pub fn generation() -> u64 {
    GENERATION.get().load(Ordering::Acquire)
}

/// Tells every backend to reload its keys at its next key access.
pub fn bump_generation() {
    GENERATION.get().fetch_add(1, Ordering::AcqRel);
}

fn my_dboid() -> u32 {
    // SAFETY: a backend global.
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

/// True when a backend of this server has already acted on this database's committed current
/// key being `version` with `fingerprint` (see [`announce`]).
pub fn announced(version: u32, fingerprint: &cellcrypt_core::Fingerprint) -> bool {
    let dboid = my_dboid();
    ANNOUNCED.share().0.iter().any(|a| a.dboid == dboid && a.version == version && a.fingerprint == fingerprint.0)
}

/// Records that a backend acted on this database's committed current key being `version` with
/// `fingerprint` (after `COMMIT PREPARED` on a Citus worker: every session told to reload, the
/// re-encryption worker started), so that the backends Citus opens afterwards do not do it
/// again. When every entry belongs to another database nothing is recorded, and each backend
/// acts once, as without it.
pub fn announce(version: u32, fingerprint: &cellcrypt_core::Fingerprint) {
    let dboid = my_dboid();
    let mut all = ANNOUNCED.exclusive();
    if let Some(i) = all.0.iter().position(|a| a.dboid == dboid).or_else(|| all.0.iter().position(|a| a.dboid == 0)) {
        all.0[i] = Announced { dboid, version, fingerprint: fingerprint.0 };
    }
}

/// A cached key version, copied out of the cache.
pub struct CachedKey {
    pub version: u32,
    pub keys: VersionKeys,
}

/// The cached current key version of this database, if any.
pub fn get() -> Option<CachedKey> {
    let dboid = my_dboid();
    let slots = CACHE.share();
    let i = slots.0.iter().position(|s| s.used && s.dboid == dboid && s.version != 0)?;
    let sec = secret(i)?;
    Some(CachedKey {
        version: slots.0[i].version,
        keys: VersionKeys {
            fingerprint: cellcrypt_core::Fingerprint(slots.0[i].fingerprint),
            data: SecretKey::from_slice(&sec.data)?,
            wrap: SecretKey::from_slice(&sec.wrap)?,
        },
    })
}

/// The administrator's key text of this database's key version `version` with fingerprint
/// `fingerprint`, held here only with the `none` provider.
pub fn key_text(version: u32, fingerprint: &str) -> Option<zeroize::Zeroizing<String>> {
    let dboid = my_dboid();
    let slots = CACHE.share();
    let i = slots
        .0
        .iter()
        .position(|s| s.used && s.dboid == dboid && s.version == version && cellcrypt_core::Fingerprint(s.fingerprint).to_string() == fingerprint)?;
    let sec = secret(i)?;
    let text = std::str::from_utf8(&sec.key_text[..sec.key_len as usize]).ok()?;
    (!text.is_empty()).then(|| zeroize::Zeroizing::new(text.to_owned()))
}

/// The databases whose slots are in use but that no longer exist (dropped), read inside a
/// transaction; outside one (a commit callback) nothing is checked.
fn dropped_databases() -> Vec<u32> {
    // SAFETY: a backend state check.
    if !unsafe { pg_sys::IsTransactionState() } {
        return Vec::new();
    }
    let mine = my_dboid();
    let in_use: Vec<u32> = CACHE.share().0.iter().filter(|s| s.used && s.dboid != mine).map(|s| s.dboid).collect();
    in_use
        .into_iter()
        // SAFETY: a syscache existence check inside a transaction, outside the cache's lock.
        .filter(|&d| !unsafe { pg_sys::SearchSysCacheExists(pg_sys::SysCacheIdentifier::DATABASEOID as i32, pg_sys::Datum::from(d), 0.into(), 0.into(), 0.into()) })
        .collect()
}

/// The slot for this database: its own, a free one, or one of a dropped database.
fn slot_for(slots: &Slots, dboid: u32, dropped: &[u32]) -> Option<usize> {
    slots
        .0
        .iter()
        .position(|s| s.used && s.dboid == dboid)
        .or_else(|| slots.0.iter().position(|s| !s.used))
        .or_else(|| slots.0.iter().position(|s| dropped.contains(&s.dboid)))
}

/// Empties slot `i` (public and secret parts); the caller holds the lock exclusively.
fn clear(slots: &mut Slots, i: usize) {
    slots.0[i] = EMPTY;
    if let Some(sec) = secret(i) {
        sec.data.zeroize();
        sec.wrap.zeroize();
        sec.key_text.zeroize();
        sec.key_len = 0;
    }
}

/// Makes sure this database has a slot, taking a free one or one of a dropped database, and
/// keeping it (a key change with the `none` provider reserves its slot before it commits, so the
/// new key can be held when it does). False when every slot belongs to a live database, or
/// there is no key mapping.
pub fn reserve() -> bool {
    if secret(0).is_none() {
        return false;
    }
    let dropped = dropped_databases();
    let dboid = my_dboid();
    let mut slots = CACHE.exclusive();
    let Some(i) = slot_for(&slots, dboid, &dropped) else { return false };
    if !(slots.0[i].used && slots.0[i].dboid == dboid) {
        clear(&mut slots, i);
        slots.0[i].used = true;
        slots.0[i].dboid = dboid;
    }
    true
}

/// Stores this database's current key version: its derived keys and, only with the `none`
/// provider (`key_text`), the administrator's key text. False when every slot is taken by
/// other (live) databases, the text is too long to hold, or there is no key mapping. Slots of
/// dropped databases are reused.
pub fn put(version: u32, keys: &VersionKeys, key_text: Option<&str>) -> bool {
    let text = key_text.unwrap_or("");
    if text.len() > MAX_KEY_TEXT || secret(0).is_none() {
        return false;
    }
    let dropped = dropped_databases();
    let dboid = my_dboid();
    let mut slots = CACHE.exclusive();
    let Some(i) = slot_for(&slots, dboid, &dropped) else { return false };
    clear(&mut slots, i);
    slots.0[i] = Slot { used: true, dboid, version, fingerprint: keys.fingerprint.0, failure: NO_FAILURE };
    let sec = secret(i).expect("checked above");
    sec.data.copy_from_slice(keys.data.expose());
    sec.wrap.copy_from_slice(keys.wrap.expose());
    sec.key_len = text.len() as u16;
    sec.key_text[..text.len()].copy_from_slice(text.as_bytes());
    true
}

/// Forgets this database's cached key (its extension was dropped or its keyring replaced).
pub fn forget() {
    let dboid = my_dboid();
    let mut slots = CACHE.exclusive();
    for i in 0..SLOTS {
        if slots.0[i].used && slots.0[i].dboid == dboid {
            clear(&mut slots, i);
        }
    }
}

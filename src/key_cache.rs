//! The process-shared key cache: one slot per database in shared memory, and a generation
//! counter that tells every backend when a key changed.
//!
//! * A slot holds the current key of one database: its version, fingerprint, the Argon2id
//!   master key and the administrator's key text. Backends take the key from here instead of
//!   running the key provider and Argon2id again, and the `none` provider keeps its keys here
//!   only. Slots are overwritten (never freed to the allocator), so a replaced key does not
//!   linger.
//! * [`generation`] is bumped after a key change commits. Every backend compares it with the
//!   generation it loaded its keys at on each key access (one atomic load), so from the commit
//!   on no session, and no parallel worker, seals with the old key.
//!
//! There are [`SLOTS`] slots. The slots of dropped databases are reused. Beyond that many live
//! databases with the extension, keys are still loaded (from the `file` or `command` provider)
//! but not shared, and a key change with the `none` provider, which keeps the key nowhere else,
//! is refused before it commits.

use cellcrypt_core::kdf::FINGERPRINT_LEN;
use cellcrypt_core::MasterKey;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, pg_sys, PGRXSharedMemory, PgAtomic, PgLwLock};
use std::sync::atomic::{AtomicU64, Ordering};

pub const SLOTS: usize = 64;
/// The longest key text a slot holds (and so the longest key `set_data_encryption_key` takes).
pub const MAX_KEY_TEXT: usize = 256;

#[derive(Clone, Copy)]
#[repr(C)]
pub struct Slot {
    used: bool,
    dboid: u32,
    version: u32,
    fingerprint: [u8; FINGERPRINT_LEN],
    master: [u8; 32],
    key_len: u16,
    key_text: [u8; MAX_KEY_TEXT],
}

const EMPTY: Slot = Slot {
    used: false,
    dboid: 0,
    version: 0,
    fingerprint: [0; FINGERPRINT_LEN],
    master: [0; 32],
    key_len: 0,
    key_text: [0; MAX_KEY_TEXT],
};

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

static CACHE: PgLwLock<Slots> = unsafe { PgLwLock::new(c"pg_cellcrypt key cache") };
static GENERATION: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"pg_cellcrypt key generation") };

/// Requests the shared memory; from `_PG_init`.
pub fn init() {
    pg_shmem_init!(CACHE);
    pg_shmem_init!(GENERATION);
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

/// A cached key, copied out of shared memory.
pub struct CachedKey {
    pub version: u32,
    pub fingerprint: [u8; FINGERPRINT_LEN],
    pub master: MasterKey,
    pub key_text: zeroize::Zeroizing<String>,
}

/// The cached current key of this database, if any.
pub fn get() -> Option<CachedKey> {
    let dboid = my_dboid();
    let slots = CACHE.share();
    let s = slots.0.iter().find(|s| s.used && s.dboid == dboid)?;
    let text = std::str::from_utf8(&s.key_text[..s.key_len as usize]).ok()?.to_owned();
    Some(CachedKey {
        version: s.version,
        fingerprint: s.fingerprint,
        master: MasterKey::from_bytes(s.master),
        key_text: zeroize::Zeroizing::new(text),
    })
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

/// Makes sure this database has a slot, taking a free one or one of a dropped database, and
/// keeping it (a key change with the `none` provider reserves its slot before it commits, so the
/// new key can be held when it does). False when every slot belongs to a live database.
pub fn reserve() -> bool {
    let dropped = dropped_databases();
    let dboid = my_dboid();
    let mut slots = CACHE.exclusive();
    let Some(i) = slot_for(&slots, dboid, &dropped) else { return false };
    if !(slots.0[i].used && slots.0[i].dboid == dboid) {
        slots.0[i] = EMPTY;
        slots.0[i].used = true;
        slots.0[i].dboid = dboid;
    }
    true
}

/// Stores this database's current key. False when every slot is taken by other (live)
/// databases or the key text is too long to hold. Slots of dropped databases are reused.
pub fn put(version: u32, master: &MasterKey, key_text: &str) -> bool {
    if key_text.len() > MAX_KEY_TEXT {
        return false;
    }
    let dropped = dropped_databases();
    let dboid = my_dboid();
    let mut slots = CACHE.exclusive();
    let Some(idx) = slot_for(&slots, dboid, &dropped) else { return false };
    let s = &mut slots.0[idx];
    *s = EMPTY;
    s.used = true;
    s.dboid = dboid;
    s.version = version;
    s.fingerprint = master.fingerprint().0;
    s.master.copy_from_slice(master.expose());
    s.key_len = key_text.len() as u16;
    s.key_text[..key_text.len()].copy_from_slice(key_text.as_bytes());
    true
}

/// Forgets this database's cached key (its extension was dropped or its keyring replaced).
pub fn forget() {
    let dboid = my_dboid();
    let mut slots = CACHE.exclusive();
    for s in slots.0.iter_mut().filter(|s| s.used && s.dboid == dboid) {
        *s = EMPTY;
    }
}

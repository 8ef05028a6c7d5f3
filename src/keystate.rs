//! The transactional key state of this session: what the open transaction and each of its
//! subtransactions staged on top of the committed state.
//!
//! The committed state is what the keyring table and the key provider say; `keys.rs` loads it.
//! A key change, a restore, the first key and an index key rotation each **stage** what they
//! did in the stage of the (sub)transaction they run in:
//! * the keys this session must use from then on ([`install_keys`]);
//! * what to do outside the database when the transaction ends: publish the new key to the
//!   shared cache, put the `file` provider's key file back (at abort), announce the change to every backend,
//!   start the re-encryption worker, complete the audit record.
//!
//! Commit of a subtransaction merges its stage into its parent's. Abort of a subtransaction
//! (`ROLLBACK TO SAVEPOINT`, a PL/pgSQL `EXCEPTION` block) discards exactly its own stage: its
//! abort effects run, and the session's keys go back to its parent's stage or to the committed
//! state, while what an earlier savepoint staged stays. Commit of the transaction runs the
//! merged commit effects; abort runs every stage's abort effects, newest first, and the session
//! reloads the committed keys. A transaction that staged anything cannot be prepared (two-phase
//! commit would run its effects in another session).
//!
//! This module holds the state only; `key_admin.rs` carries out the effects.

use crate::keys::{self, LoadedKeys};
use cellcrypt_core::VersionKeys;
use pgrx::pg_sys;
use std::cell::RefCell;
use std::rc::Rc;
use zeroize::Zeroizing;

/// The `file` provider's key file content: (version, key text).
pub type KeyFile = Vec<(u32, Zeroizing<String>)>;

/// What one (sub)transaction staged.
#[derive(Default)]
pub struct Stage {
    subxact: pg_sys::SubTransactionId,
    /// Put into the shared cache and announce at commit: the version, its derived keys, and
    /// the administrator's key text only with the `none` provider (the cache is its only copy).
    pub publish: Option<(u32, VersionKeys, Option<Zeroizing<String>>)>,
    /// Forget the shared cache and announce at commit (the keyring was replaced by a restore).
    pub forget: bool,
    /// The key file as it was before this stage changed it, to put back at abort.
    pub file_after_abort: Option<KeyFile>,
    /// Bump the generation at commit (older keys were retired, or the index key changed).
    pub announce: bool,
    /// Start this database's re-encryption worker at commit.
    pub launch_worker: bool,
    /// (action, version, fingerprint) to record as committed or rolled back.
    pub audit: Vec<(&'static str, Option<u32>, String)>,
    /// The keys this stage installed for the session.
    keys: Option<Rc<LoadedKeys>>,
}

impl Stage {
    /// Folds `child`, which committed into this stage, into it: the child's later choices win,
    /// the earliest pre-image of the key file stays.
    fn absorb(&mut self, child: Stage) {
        if child.forget {
            self.forget = true;
            self.publish = None;
        }
        if child.publish.is_some() {
            self.publish = child.publish;
        }
        if self.file_after_abort.is_none() {
            self.file_after_abort = child.file_after_abort;
        }
        self.announce |= child.announce;
        self.launch_worker |= child.launch_worker;
        self.audit.extend(child.audit);
        if child.keys.is_some() {
            self.keys = child.keys;
        }
    }

    /// True when this stage has nothing to do at the end of its transaction.
    fn is_empty(&self) -> bool {
        self.publish.is_none()
            && !self.forget
            && self.file_after_abort.is_none()
            && !self.announce
            && !self.launch_worker
            && self.audit.is_empty()
            && self.keys.is_none()
    }
}

thread_local! {
    /// One stage per (sub)transaction that staged something, outermost first.
    static STACK: RefCell<Vec<Stage>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with the stage of the current (sub)transaction, created if needed.
pub fn stage<R>(f: impl FnOnce(&mut Stage) -> R) -> R {
    // SAFETY: a backend call.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    STACK.with(|s| {
        let mut s = s.borrow_mut();
        if s.last().map(|t| t.subxact) != Some(subxact) {
            s.push(Stage { subxact, ..Default::default() });
        }
        f(s.last_mut().expect("just pushed"))
    })
}

/// Makes `k` the keys of this session from now on, as staged by the current (sub)transaction.
pub fn install_keys(mut k: LoadedKeys) {
    k.generation = keys::STAGED;
    let k = Rc::new(k);
    keys::set_loaded(Some(k.clone()));
    stage(|s| s.keys = Some(k));
}

/// Makes every backend reload its keys when this transaction commits, and drop the plans it
/// cached: a plan may hold a value encrypted when its statement was parsed (a literal in a
/// prepared statement or a PL/pgSQL function), under a key that is then gone. Parsed again,
/// such a value is encrypted again under the current key.
pub fn announce_at_commit() {
    stage(|s| s.announce = true);
    // SAFETY: queues a flush of the pg_namespace catalog caches, sent only if this transaction
    // commits; every backend's plan cache resets on it (PlanCacheSysCallback), including plans
    // that reference no table, which a relcache invalidation would not reach.
    unsafe { pg_sys::CacheInvalidateCatalog(pg_sys::NamespaceRelationId) };
}

/// True when the open transaction staged anything.
pub fn has_staged() -> bool {
    STACK.with(|s| s.borrow().iter().any(|t| !t.is_empty()))
}

/// Subtransaction `sub` committed into `parent`: its stage becomes part of the parent's.
pub fn subtransaction_committed(sub: pg_sys::SubTransactionId, parent: pg_sys::SubTransactionId) {
    STACK.with(|s| {
        let mut s = s.borrow_mut();
        if s.last().map(|t| t.subxact) != Some(sub) {
            return;
        }
        let mut child = s.pop().expect("checked");
        match s.last_mut() {
            Some(p) if p.subxact == parent => p.absorb(child),
            _ => {
                child.subxact = parent;
                s.push(child);
            }
        }
    })
}

/// Subtransaction `sub` rolled back: returns its stage, whose abort effects the caller runs,
/// and puts the session's keys back to what the enclosing stages installed, or to the committed
/// state.
pub fn subtransaction_aborted(sub: pg_sys::SubTransactionId) -> Option<Stage> {
    let popped = STACK.with(|s| {
        let mut s = s.borrow_mut();
        if s.last().map(|t| t.subxact) != Some(sub) {
            return None;
        }
        s.pop()
    })?;
    if popped.keys.is_some() {
        restore_enclosing_keys();
    }
    Some(popped)
}

fn restore_enclosing_keys() {
    let enclosing = STACK.with(|s| s.borrow().iter().rev().find_map(|t| t.keys.clone()));
    match enclosing {
        Some(k) => keys::set_loaded(Some(k)),
        None => keys::invalidate(),
    }
}

/// The transaction committed: every stage merged into one, whose commit effects the caller runs.
pub fn transaction_committed() -> Option<Stage> {
    let stages = STACK.with(|s| std::mem::take(&mut *s.borrow_mut()));
    // The staged keys served this transaction only: the next one loads the committed state.
    if stages.iter().any(|t| t.keys.is_some()) {
        keys::invalidate();
    }
    let mut it = stages.into_iter();
    let mut merged = it.next()?;
    for child in it {
        merged.absorb(child);
    }
    Some(merged)
}

/// The transaction rolled back: every stage, newest first, whose abort effects the caller runs
/// in that order. The session reloads the committed keys at its next key access.
pub fn transaction_aborted() -> Vec<Stage> {
    let mut stages = STACK.with(|s| std::mem::take(&mut *s.borrow_mut()));
    stages.reverse();
    if stages.iter().any(|t| t.keys.is_some()) {
        keys::invalidate();
    }
    stages
}

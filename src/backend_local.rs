//! Per-backend state without thread-local storage.
//!
//! A PostgreSQL backend is one process that runs SQL functions on one thread (pgrx checks this
//! at every call into PostgreSQL). `thread_local!` in a shared library costs a call to
//! `__tls_get_addr` on every access, which showed in the profile of a decrypting scan; the
//! per-value paths (key cache, AAD contexts, type lookup) keep their state here instead.

use std::cell::UnsafeCell;

/// A value owned by the backend's one thread. The API mirrors `LocalKey::with`.
pub struct BackendLocal<T>(UnsafeCell<T>);

// SAFETY: only the backend's main thread runs extension code; pgrx refuses calls from others.
unsafe impl<T> Sync for BackendLocal<T> {}

impl<T> BackendLocal<T> {
    pub const fn new(value: T) -> Self {
        BackendLocal(UnsafeCell::new(value))
    }

    /// Runs `f` with a shared reference; interior mutability (`Cell`, `RefCell`) does the rest.
    pub fn with<R>(&'static self, f: impl FnOnce(&T) -> R) -> R {
        // SAFETY: single-threaded access, and only shared references are handed out.
        f(unsafe { &*self.0.get() })
    }
}

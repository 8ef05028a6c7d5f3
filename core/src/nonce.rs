//! Nonces: 192 random bits per value (envelope version 2) from a process-local CSPRNG.
//!
//! [`NonceSource`] is a ChaCha12 generator (`rand::rngs::StdRng`) seeded from the operating
//! system. Drawing a nonce is a few dozen nanoseconds and no system call; the generator reseeds
//! itself from the OS every [`RESEED_INTERVAL`] nonces.
//!
//! **Fork safety.** PostgreSQL forks every backend from the postmaster. A generator copied by
//! `fork()` would hand the same nonces to two processes, which is fatal for GCM. A
//! `pthread_atfork` child handler bumps a process-wide fork generation; a source that sees a
//! generation other than the one it was seeded in reseeds before drawing.

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

/// Nonces drawn between two reseeds from the operating system.
pub const RESEED_INTERVAL: u64 = 1 << 20;

static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);
static REGISTER_ATFORK: Once = Once::new();

extern "C" fn after_fork_in_child() {
    FORK_GENERATION.fetch_add(1, Ordering::SeqCst);
}

fn register_fork_handler() {
    REGISTER_ATFORK.call_once(|| {
        // SAFETY: registering a handler that only touches an atomic is async-signal-safe.
        #[allow(unsafe_code)]
        unsafe {
            libc::pthread_atfork(None, None, Some(after_fork_in_child));
        }
    });
}

/// A per-process source of unique random nonces. Not `Sync`: keep one per thread.
pub struct NonceSource {
    rng: StdRng,
    fork_generation: u64,
    until_reseed: u64,
}

impl NonceSource {
    /// A source seeded from the operating system's CSPRNG.
    pub fn from_os() -> Self {
        register_fork_handler();
        NonceSource {
            rng: StdRng::from_os_rng(),
            fork_generation: FORK_GENERATION.load(Ordering::SeqCst),
            until_reseed: RESEED_INTERVAL,
        }
    }

    fn reseed(&mut self) {
        self.rng = StdRng::from_os_rng();
        self.fork_generation = FORK_GENERATION.load(Ordering::SeqCst);
        self.until_reseed = RESEED_INTERVAL;
    }

    /// Fills `out` with fresh random bytes (a nonce).
    #[inline]
    pub fn fill(&mut self, out: &mut [u8]) {
        if self.until_reseed == 0 || self.fork_generation != FORK_GENERATION.load(Ordering::Relaxed) {
            self.reseed();
        }
        self.until_reseed -= 1;
        self.rng.fill_bytes(out);
    }

    pub fn next_nonce(&mut self) -> [u8; 12] {
        let mut n = [0u8; 12];
        self.fill(&mut n);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn nonces_do_not_repeat_across_reseeds() {
        let mut s = NonceSource::from_os();
        s.until_reseed = 1000;
        let mut seen = HashSet::new();
        for _ in 0..50_000 {
            assert!(seen.insert(s.next_nonce()));
        }
    }

    #[test]
    fn two_sources_differ() {
        let mut a = NonceSource::from_os();
        let mut b = NonceSource::from_os();
        assert_ne!(a.next_nonce(), b.next_nonce());
    }

    #[test]
    fn fork_generation_change_forces_reseed() {
        let mut s = NonceSource::from_os();
        let before = s.fork_generation;
        after_fork_in_child();
        let _ = s.next_nonce();
        assert_eq!(s.fork_generation, before + 1);
        assert_eq!(s.until_reseed, RESEED_INTERVAL - 1);
    }
}

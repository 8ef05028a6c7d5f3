//! Nonces: 192 random bits per value (envelope version 2), from AWS-LC's DRBG.
//!
//! [`NonceSource`] hands out bytes of AWS-LC's `RAND_bytes` (its SP 800-90A CTR_DRBG, the
//! validated module's own in a FIPS build), fetched [`BUFFER_LEN`] bytes at a time: one
//! `RAND_bytes` call costs about 300 ns whatever its length, so a call per value would triple
//! the cost of sealing a small one. Buffered, a nonce is a copy of 24 bytes.
//!
//! **Fork safety.** PostgreSQL forks every backend from the postmaster. Bytes buffered before a
//! `fork()` would be handed out by both processes, which is fatal for GCM. A `pthread_atfork`
//! child handler bumps a process-wide fork generation; a source that sees a generation other
//! than the one it filled its buffer in throws the buffer away before drawing. (AWS-LC's DRBG
//! is fork-safe itself.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;
use zeroize::Zeroize;

/// Bytes fetched from the DRBG at a time.
pub const BUFFER_LEN: usize = 4096;

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

/// How many times this process's ancestors and itself were forked: value-key slots made before
/// a fork are not used after it.
pub(crate) fn fork_generation() -> u64 {
    register_fork_handler();
    FORK_GENERATION.load(Ordering::Relaxed)
}

/// What a fork does to the fork generation, for tests of code that must notice a fork.
#[cfg(test)]
pub(crate) static FORK_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
pub(crate) fn tests_bump_fork_generation() {
    after_fork_in_child();
}

/// Fills `out` from AWS-LC's DRBG (the FIPS module's in a FIPS build). Keys, salts and nonces
/// all come from here.
pub fn random_fill(out: &mut [u8]) {
    aws_lc_rs::rand::fill(out).expect("AWS-LC's random number generator failed");
}

/// A per-process source of unique random nonces. `fill` takes `&mut self`: keep one per thread.
pub struct NonceSource {
    buf: Box<[u8; BUFFER_LEN]>,
    /// Bytes of `buf` not handed out yet (its tail).
    left: usize,
    fork_generation: u64,
}

impl NonceSource {
    /// A source drawing from AWS-LC's DRBG.
    pub fn from_os() -> Self {
        register_fork_handler();
        let mut s = NonceSource { buf: Box::new([0u8; BUFFER_LEN]), left: 0, fork_generation: 0 };
        s.refill();
        s
    }

    fn refill(&mut self) {
        self.fork_generation = FORK_GENERATION.load(Ordering::SeqCst);
        random_fill(&mut self.buf[..]);
        self.left = BUFFER_LEN;
    }

    /// Fills `out` with fresh random bytes (a nonce), each handed out once.
    #[inline]
    pub fn fill(&mut self, out: &mut [u8]) {
        if self.fork_generation != FORK_GENERATION.load(Ordering::Relaxed) {
            self.refill();
        }
        let mut done = 0;
        while done < out.len() {
            if self.left == 0 {
                self.refill();
            }
            let n = (out.len() - done).min(self.left);
            let from = BUFFER_LEN - self.left;
            out[done..done + n].copy_from_slice(&self.buf[from..from + n]);
            // Bytes handed out are not kept.
            self.buf[from..from + n].zeroize();
            self.left -= n;
            done += n;
        }
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
    fn nonces_do_not_repeat_across_refills() {
        let mut s = NonceSource::from_os();
        let mut seen = HashSet::new();
        // 50,000 nonces of 12 bytes: about 150 refills of the buffer.
        for _ in 0..50_000 {
            assert!(seen.insert(s.next_nonce()));
        }
    }

    #[test]
    fn draws_longer_than_the_buffer_and_across_its_end() {
        let mut s = NonceSource::from_os();
        let mut a = [0u8; 5];
        s.fill(&mut a);
        let mut big = vec![0u8; BUFFER_LEN * 2 + 7];
        s.fill(&mut big);
        assert!(big.chunks(32).all(|c| c.iter().any(|&b| b != 0)), "every stretch of the output is random");
        assert_ne!(&big[..BUFFER_LEN], &big[BUFFER_LEN..2 * BUFFER_LEN]);
    }

    #[test]
    fn two_sources_differ() {
        let mut a = NonceSource::from_os();
        let mut b = NonceSource::from_os();
        assert_ne!(a.next_nonce(), b.next_nonce());
    }

    #[test]
    fn fork_generation_change_discards_the_buffer() {
        let _serial = FORK_TESTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut s = NonceSource::from_os();
        let _ = s.next_nonce();
        let before = s.fork_generation;
        // What the buffer would have handed out next, had no fork happened.
        let next = s.buf[BUFFER_LEN - s.left..BUFFER_LEN - s.left + 12].to_vec();
        after_fork_in_child();
        let n = s.next_nonce();
        assert_eq!(s.fork_generation, before + 1);
        assert_eq!(s.left, BUFFER_LEN - 12, "a fresh buffer was fetched");
        assert_ne!(&n[..], &next[..]);
    }
}

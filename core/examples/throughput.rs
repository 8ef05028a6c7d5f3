//! The crypto core's own speed, measured alone (no PostgreSQL): `make bench` runs it in the
//! same run as the SQL cases and compares. Prints CSV lines `case,value,unit`.
//!
//! `cargo run --release -p cellcrypt-core --example throughput`

use cellcrypt_core::envelope::{self, Envelope};
use cellcrypt_core::{DataCipher, NonceSource, SecretKey};
use std::time::Instant;

fn measure(size: usize, min_bytes: usize) -> (f64, f64) {
    let cipher = DataCipher::new(1, &SecretKey::random());
    let mut nonces = NonceSource::from_os();
    let plain: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    let mut sealed = vec![0u8; envelope::sealed_len(size)];
    let mut opened = vec![0u8; size];
    let iters = (min_bytes / size).max(1000);
    // warm up
    for _ in 0..iters / 10 {
        cipher.seal_into(&mut nonces, b"bytea", &plain, &mut sealed);
    }
    let t = Instant::now();
    for _ in 0..iters {
        cipher.seal_into(&mut nonces, b"bytea", &plain, &mut sealed);
    }
    let seal_s = t.elapsed().as_secs_f64();
    let env = Envelope::parse(&sealed).unwrap();
    let t = Instant::now();
    for _ in 0..iters {
        cipher.open_into(&env, b"bytea", &mut opened).unwrap();
    }
    let open_s = t.elapsed().as_secs_f64();
    assert_eq!(opened, plain);
    (seal_s / iters as f64, open_s / iters as f64)
}

/// Opening values that each have a salt of their own (values sealed by many processes, or
/// before 0.2.0's value-key reuse): every open derives a value key. Values from
/// `2 * OPEN_CACHE` ciphers of the same key, each its own salt, opened round robin.
fn measure_open_cold(size: usize) -> f64 {
    let key = SecretKey::random();
    let n_salts = 2 * cellcrypt_core::cipher::OPEN_CACHE;
    let mut nonces = NonceSource::from_os();
    let plain: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    let sealed: Vec<Vec<u8>> = (0..n_salts).map(|_| DataCipher::new(1, &key).seal(&mut nonces, b"bytea", &plain)).collect();
    let opener = DataCipher::new(1, &key);
    let mut opened = vec![0u8; size];
    let iters = 200_000;
    let envs: Vec<Envelope> = sealed.iter().map(|s| Envelope::parse(s).unwrap()).collect();
    let t = Instant::now();
    for i in 0..iters {
        opener.open_into(&envs[i % n_salts], b"bytea", &mut opened).unwrap();
    }
    t.elapsed().as_secs_f64() / iters as f64
}

fn main() {
    let (seal, open) = measure(64 * 1024, 2 << 30);
    let mbs = |s: f64| 64.0 * 1024.0 / s / 1e6;
    println!("core_seal_64k,{:.0},MB/s", mbs(seal));
    println!("core_open_64k,{:.0},MB/s", mbs(open));
    let (seal, open) = measure(100, 200 << 20);
    println!("core_seal_100b,{:.0},ns", seal * 1e9);
    println!("core_open_100b,{:.0},ns", open * 1e9);
    println!("core_open_100b_own_salt,{:.0},ns", measure_open_cold(100) * 1e9);
    let (seal, open) = measure(1024, 400 << 20);
    println!("core_seal_1k,{:.0},ns", seal * 1e9);
    println!("core_open_1k,{:.0},ns", open * 1e9);
}

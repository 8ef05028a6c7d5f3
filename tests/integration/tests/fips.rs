//! The crypto module: which AWS-LC the library links, FIPS mode, the self-tests that keep a
//! broken library from loading, and what a FIPS build refuses. Runs against the default build
//! in `make test-integration`, and against the FIPS build in `make test-fips`
//! (CELLCRYPT_EXPECT_FIPS=1).

use cellcrypt_integration::*;
use postgres::error::SqlState;

fn fips_expected() -> bool {
    std::env::var("CELLCRYPT_EXPECT_FIPS").is_ok_and(|v| v == "1")
}

const PASSPHRASE: &str = "Tq8#vL2!pZr9@wXe4$mKs7^bYc-violet";

fn kdf_of_current(c: &Cluster, db: &str) -> String {
    c.psql(db, "SELECT kdf_memory_kib || ' ' || kdf_iterations || ' ' || kdf_parallelism FROM cellcrypt.keyring WHERE state = 'current'")
        .trim()
        .to_owned()
}

fn all_read_back(c: &Cluster, db: &str) -> i64 {
    let mut fresh = c.connect(Transport::Unix, db);
    fresh.query_one("SELECT count(*) FROM t WHERE decrypt(v) = 'secret ' || id", &[]).unwrap().get(0)
}

#[test]
fn status_names_the_crypto_module_and_keys_follow_the_build_s_rules() {
    let c = Cluster::start("crypto-module", &[]);
    c.database_with_extension("app");
    let mut s = c.connect(Transport::TcpSsl, "app");
    let row = s.query_one("SELECT crypto_module, fips_mode FROM data_encryption_status", &[]).unwrap();
    let (module, mode): (String, bool) = (row.get(0), row.get(1));
    assert_eq!(mode, fips_expected(), "fips_mode of {module}");
    // A FIPS build names the version the linked module reports, which must be the one
    // certificate #5314 validates (its load-time self-test refuses any other).
    let certified = "AWS-LC FIPS 3.1.0 (aws-lc-fips-sys 0.13.11; FIPS 140-3 certificate #5314)";
    assert_eq!(module == certified, fips_expected(), "{module}");
    assert!(module.starts_with("AWS-LC"), "{module}");

    s.batch_execute("CREATE TABLE t (id int, v encrypted_text); INSERT INTO t SELECT g, 'secret ' || g FROM generate_series(1, 3000) g").unwrap();
    // Value keys: one statement's values share a salt (the first 12 nonce bytes, in the clear),
    // two transactions never do, and no two values share a nonce.
    let salts = "SELECT count(DISTINCT substring(decode(substr(format('%s', v), 5), 'base64') FROM 6 FOR 12)) || ' ' || \
                 count(DISTINCT substring(decode(substr(format('%s', v), 5), 'base64') FROM 6 FOR 24)) FROM t";
    assert_eq!(c.psql("app", salts).trim(), "1 3000");
    for i in 3001..=3005 {
        s.execute("INSERT INTO t VALUES ($1::int, 'secret ' || $1::int)", &[&i]).unwrap();
    }
    s.batch_execute("BEGIN; INSERT INTO t VALUES (3006, 'secret 3006'); INSERT INTO t VALUES (3007, 'secret 3007'); COMMIT").unwrap();
    assert_eq!(c.psql("app", salts).trim(), "7 3007", "a salt per transaction");
    s.batch_execute("DELETE FROM t WHERE id > 3000").unwrap();
    // The first key (CREATE EXTENSION's) and every generated key: HKDF key versions (costs 0).
    assert_eq!(kdf_of_current(&c, "app"), "0 0 0");
    let key: String = s.query_one("SELECT generate_data_encryption_key()", &[]).unwrap().get(0);
    s.query_one("SELECT set_data_encryption_key($1)", &[&key]).unwrap();
    c.wait_reencrypted("app");
    assert_eq!(kdf_of_current(&c, "app"), "0 0 0");
    assert_eq!(c.psql("app", "SELECT count(DISTINCT encryption_key_version(v)) FROM t").trim(), "1");

    // A passphrase: Argon2id in the default build; a FIPS build refuses it and changes nothing.
    let version = c.psql("app", "SELECT key_version FROM data_encryption_status");
    let set = s.query_one("SELECT set_data_encryption_key($1)", &[&PASSPHRASE]);
    if fips_expected() {
        let e = db_error(set);
        assert_eq!(e.code(), &SqlState::INVALID_PARAMETER_VALUE);
        assert!(e.message().contains("FIPS build") && e.message().contains("generated keys"), "{}", e.message());
        assert!(e.detail().unwrap_or("").contains("FIPS build"), "{:?}", e.detail());
        assert!(!format!("{} {:?} {:?}", e.message(), e.detail(), e.hint()).contains(PASSPHRASE));
        assert_eq!(c.psql("app", "SELECT key_version FROM data_encryption_status"), version);
    } else {
        set.unwrap();
        c.wait_reencrypted("app");
        assert_eq!(kdf_of_current(&c, "app"), "19456 2 1", "a passphrase's version: Argon2id at the default cost");
    }
    assert!(!c.server_log().contains(PASSPHRASE));

    // Every committed value, from a fresh session after a restart.
    c.restart();
    assert_eq!(all_read_back(&c, "app"), 3000);
}

/// A library whose known-answer tests fail does not load, so the server does not start with it
/// (fault-injection builds, what the suites run, can fail one on purpose); with the tests
/// passing again, nothing was lost.
#[test]
fn a_failing_self_test_keeps_the_library_from_loading() {
    let c = Cluster::start("self-test", &[]);
    c.database_with_extension("app");
    c.psql("app", "CREATE TABLE t (id int, v encrypted_text); INSERT INTO t SELECT g, 'secret ' || g FROM generate_series(1, 500) g");
    // A FIPS build also checks that the linked module is the certified version.
    let tests: &[&str] = if fips_expected() { &["AES-256-GCM", "HKDF-SHA256", "HMAC-SHA256", "module version"] } else { &["AES-256-GCM", "HKDF-SHA256", "HMAC-SHA256"] };
    for &broken in tests {
        c.stop();
        let flag = c.dir.join("data/pg_cellcrypt.break_self_test");
        std::fs::write(&flag, broken).unwrap();
        let started = std::panic::catch_unwind(|| c.start_again());
        assert!(started.is_err(), "the server started with a failing {broken} self-test");
        let log = c.server_log();
        assert!(log.contains(&format!("pg_cellcrypt refuses to load: the {broken} self-test failed")), "{log}");
        assert!(log.contains("Crypto module: AWS-LC"), "{log}");
        std::fs::remove_file(&flag).unwrap();
        c.start_again();
        assert_eq!(all_read_back(&c, "app"), 500, "after the {broken} failure");
    }
}

/// A key version as 0.1.0 made it: a generated key run through Argon2id (0.2.0 derives new
/// versions of generated keys with HKDF). The keyring row is made here from the key and salt,
/// as 0.1.0 would have stored it. The default build loads it and changes away from it; a FIPS
/// build refuses it, with 0A000 and what to do.
#[test]
fn a_generated_key_s_argon2id_version_from_0_1_0() {
    let c = Cluster::start("argon2-version", &[]);
    c.database_with_extension("app");
    let mut s = c.connect(Transport::TcpSsl, "app");
    let key: String = s.query_one("SELECT retrieve_data_encryption_key()", &[]).unwrap().get(0);
    let salt_hex = c.psql("app", "SELECT encode(kdf_salt, 'hex') FROM cellcrypt.keyring WHERE state = 'current'");
    let salt: Vec<u8> = (0..salt_hex.trim().len()).step_by(2).map(|i| u8::from_str_radix(&salt_hex.trim()[i..i + 2], 16).unwrap()).collect();
    let floor = cellcrypt_core::kdf::KDF_FLOOR;
    let master = cellcrypt_core::MasterKey::derive(&cellcrypt_core::AdminKey::parse(&key).unwrap(), &salt, &floor).unwrap();
    c.psql(
        "app",
        &format!(
            "UPDATE cellcrypt.keyring SET kdf_memory_kib = {}, kdf_iterations = {}, kdf_parallelism = {}, fingerprint = '{}' WHERE state = 'current'",
            floor.m_cost_kib,
            floor.t_cost,
            floor.p_cost,
            master.fingerprint()
        ),
    );
    drop(s);
    c.restart();
    let mut s = c.connect(Transport::TcpSsl, "app");
    let written = s.batch_execute("CREATE TABLE t (id int, v encrypted_text); INSERT INTO t SELECT g, 'secret ' || g FROM generate_series(1, 1000) g");
    if fips_expected() {
        let e = db_error(written);
        assert_eq!(e.code(), &SqlState::FEATURE_NOT_SUPPORTED);
        assert!(e.message().contains("cannot be derived by this build") && e.message().contains("Argon2id"), "{}", e.message());
        assert!(e.hint().unwrap_or("").contains("default build"), "{:?}", e.hint());
        assert!(!format!("{} {:?} {:?}", e.message(), e.detail(), e.hint()).contains(&key[5..]));
        // Restoring the same key cannot help either: 0A000, nothing changed.
        let e = db_error(s.query_one("SELECT set_data_encryption_key($1)", &[&key]));
        assert_eq!(e.code(), &SqlState::FEATURE_NOT_SUPPORTED, "{}", e.message());
        let fp = c.psql("app", "SELECT fingerprint FROM cellcrypt.keyring WHERE state = 'current'");
        assert_eq!(fp.trim(), master.fingerprint().to_string());
        return;
    }
    written.unwrap();
    c.restart();
    assert_eq!(all_read_back(&c, "app"), 1000, "an Argon2id version of a generated key loads");
    let mut s = c.connect(Transport::TcpSsl, "app");
    let fresh: String = s.query_one("SELECT generate_data_encryption_key()", &[]).unwrap().get(0);
    s.query_one("SELECT set_data_encryption_key($1)", &[&fresh]).unwrap();
    c.wait_reencrypted("app");
    assert_eq!(kdf_of_current(&c, "app"), "0 0 0", "the new version is HKDF");
    c.restart();
    assert_eq!(all_read_back(&c, "app"), 1000);
    // A forged row (costs below the floor) is refused before anything is derived: an altered
    // keyring row (XX001), and the hint says to restore it.
    c.psql("app", "UPDATE cellcrypt.keyring SET kdf_memory_kib = 64, kdf_iterations = 1, kdf_parallelism = 1 WHERE state = 'current'");
    c.restart();
    let e = db_error(c.connect(Transport::Unix, "app").query_one("SELECT count(*) FROM t WHERE decrypt(v) IS NOT NULL", &[]));
    assert_eq!(e.code(), &SqlState::DATA_CORRUPTED);
    assert!(e.message().contains("out of range"), "{}", e.message());
    assert!(e.hint().unwrap_or("").contains("restore cellcrypt.keyring"), "{:?}", e.hint());
}

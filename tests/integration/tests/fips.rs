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
    assert_eq!(module.contains("FIPS 140-3 module"), fips_expected(), "{module}");
    assert!(module.starts_with("AWS-LC"), "{module}");

    s.batch_execute("CREATE TABLE t (id int, v encrypted_text); INSERT INTO t SELECT g, 'secret ' || g FROM generate_series(1, 3000) g").unwrap();
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
    for broken in ["AES-256-GCM", "HKDF-SHA256", "HMAC-SHA256"] {
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

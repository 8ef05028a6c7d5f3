//! `ALTER EXTENSION pg_cellcrypt UPDATE` from the released 0.1.0 gives the catalog of a fresh
//! install of this version, object by object, and keeps every key and value. Runs on whichever
//! major the suites run against (`CELLCRYPT_PGBIN`).

use cellcrypt_integration::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Puts the install script of the released 0.1.0 (`sql/pg_cellcrypt--0.1.0.sql`, generated from
/// the tag v0.1.0 by `scripts/version-sql.sh`) beside the installed extension for as long as
/// it lives, as a server that had 0.1.0 installed has it. (Only this test names version 0.1.0;
/// every other `CREATE EXTENSION` installs the default version.)
struct OldInstallScript(PathBuf);

impl OldInstallScript {
    fn put(bin: &Path) -> OldInstallScript {
        let out = Command::new(bin.join("pg_config")).arg("--sharedir").output().unwrap();
        let dest = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("extension/pg_cellcrypt--0.1.0.sql");
        std::fs::copy(repo().join("sql/pg_cellcrypt--0.1.0.sql"), &dest).unwrap();
        OldInstallScript(dest)
    }
}

impl Drop for OldInstallScript {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn alter_extension_update_from_0_1_0_gives_a_fresh_install_s_catalog_and_keeps_every_value() {
    let c = Cluster::start("ext-update", &[]);
    let _script = OldInstallScript::put(&c.bin);
    let new_version = c.psql("postgres", "SELECT default_version FROM pg_available_extensions WHERE name = 'pg_cellcrypt'").trim().to_owned();
    assert_ne!(new_version, "0.1.0");

    // A database on 0.1.0, filled as an application would: every type, a blind index, a
    // finished key change, grants to an application role.
    c.createdb("app");
    c.psql("app", "CREATE EXTENSION pg_cellcrypt VERSION '0.1.0'");
    assert_eq!(c.psql("app", "SELECT extversion FROM pg_extension WHERE extname = 'pg_cellcrypt'").trim(), "0.1.0");
    c.psql("app", ALL_TYPES_FILL);
    c.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    c.wait_reencrypted("app");
    c.psql("app", "SELECT register_blind_index('people', 'email', 'lower_trim')");
    c.psql("app", "CREATE INDEX people_email_bidx ON people (blind_index(email))");
    c.psql("app", "CREATE ROLE app_user LOGIN; GRANT data_encryption_reader TO app_user; GRANT SELECT, INSERT ON t, people TO app_user");
    let before = all_types_digests(&c, "app");
    let key = c.psql("app", "SELECT retrieve_data_encryption_key()").trim().to_owned();
    let status_before = c.psql("app", "SELECT key_version, fingerprint, previous_key_versions FROM data_encryption_status");

    // On PostgreSQL 17 and later, 0.1.0's DDL check let arrays of encrypted types through
    // (their array types are extension members there): the update names such a column.
    let major = c.server_major();
    if major >= 17 {
        c.psql("app", "CREATE TABLE nested (id int, tags encrypted_text[])");
    }

    // The update, then: the version, the same key and key state, every value.
    let out = c.psql_raw("app", "ALTER EXTENSION pg_cellcrypt UPDATE");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let warned = String::from_utf8_lossy(&out.stderr).contains("these columns hold encrypted values nested in other types: nested.tags (encrypted_text[])");
    assert_eq!(warned, major >= 17, "the update's warning: {}", String::from_utf8_lossy(&out.stderr));
    if major >= 17 {
        c.psql("app", "DROP TABLE nested");
        // And 0.2.0's check refuses such a column.
        assert!(!c.psql_raw("app", "CREATE TABLE nested (id int, tags encrypted_text[])").status.success());
    }
    assert_eq!(c.psql("app", "SELECT extversion FROM pg_extension WHERE extname = 'pg_cellcrypt'").trim(), new_version);
    c.restart();
    assert_eq!(all_types_digests(&c, "app"), before);
    assert_eq!(c.psql("app", "SELECT retrieve_data_encryption_key()").trim(), key);
    assert_eq!(c.psql("app", "SELECT key_version, fingerprint, previous_key_versions FROM data_encryption_status"), status_before);
    assert_eq!(blind_index_lookup(&c, "app"), "7");

    // The catalog equals a fresh install's of the new version, object by object.
    c.createdb("fresh");
    c.psql("fresh", "CREATE EXTENSION pg_cellcrypt");
    assert_same_catalog("ALTER EXTENSION UPDATE", &extension_catalog(&c, "app"), &extension_catalog(&c, "fresh"));

    // The updated database goes on: the application role writes and reads, a key change
    // re-encrypts everything, and all of it reads back after a restart.
    let mut app = c.connect_as(Transport::TcpSsl, "app", "app_user");
    app.execute("INSERT INTO people VALUES (101, $1::text)", &[&"late@example.com"]).unwrap();
    let got: String = app.query_one("SELECT decrypt(email) FROM people WHERE id = 101", &[]).unwrap().get(0);
    assert_eq!(got, "late@example.com");
    c.psql("app", "SELECT set_data_encryption_key(generate_data_encryption_key())");
    c.wait_reencrypted("app");
    c.restart();
    assert_eq!(c.psql("app", ALL_TYPES_DIGEST), before.0);
    assert!(c.psql("app", PEOPLE_DIGEST).starts_with("101:"));
    assert_eq!(blind_index_lookup(&c, "app"), "7");
}
